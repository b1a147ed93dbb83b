"""The paper's other networks: DeepLab-MSc-LargeFOV, DeepLab-MSc and DeepLab-7x7 (and the table they share with
LargeFOV and DeepLab): equal numbers with OpenCV's independent Caffe on the deploy prototxts our code writes,
conversion of the authors' layouts, detection from blob shapes, their CRF presets and every command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_scores, cli, one_line_error, opencv_caffe
from PIL import Image

from deeplab_cli.archs import ARCHS, MSC_SOURCES, ArchConfig
from deeplab_cli.crf import PRESETS
from deeplab_cli.errors import DeeplabError
from deeplab_cli.model import DeepLab, infer_arch
from deeplab_cli.pipeline import Segmenter
from deeplab_cli.testing import caffemodel_bytes, random_model, random_state_dict
from deeplab_cli.transforms import padded_size, preprocess, to_tensor, upsample_scores
from deeplab_cli.weightfiles.caffe import CaffeLayer, _conv_weight, caffe_name, deploy_prototxt, map_layers
from deeplab_cli.weightfiles.formats import load_weights, save_weights

CLASSES = 5
NEW = ["msc-largefov", "msc", "7x7"]


def narrow(arch: str, width: int = 32) -> ArchConfig:
    """The architecture with fc6/fc7 `width` channels wide: the same geometry (kernels, holes, pads, pools,
    branches, crop) at a fraction of the parameters; the numbers depend on the geometry, not on the width."""
    cfg = ARCHS[arch]
    return replace(cfg, name=f"{arch}-narrow", fc6=(*cfg.fc6[:3], width), fc7=width)


def _image(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))


def _scores_blob(cfg: ArchConfig) -> str:
    """The deploy prototxt's class-score blob: fc8_voc12, or the multi-scale sum fc8_fuse."""
    return caffe_name(cfg.layers(CLASSES)[-1].top)


# ---------------------------------------------------------------------------------------------
# OpenCV's Caffe vs ours, every variant, sides aligned and not


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_scores_equal_opencv_caffe(arch: str, aligned: bool, photo: np.ndarray, tmp_path: Path) -> None:
    cfg = narrow(arch)
    model = random_model(cfg, CLASSES, seed=11)
    image = _image(photo, 45, 61)  # 45×61 is neither 8k+1 nor 16k+2
    size = padded_size(45, 61, cfg) if aligned else (45, 61)
    x = preprocess(to_tensor(image)[None], size)
    caffemodel, prototxt = tmp_path / "m.caffemodel", tmp_path / "deploy.prototxt"
    # The authors' old V1 `layers` layout for half the variants, the current `layer` one for the others.
    caffemodel.write_bytes(caffemodel_bytes(model.state_dict(), "fc8_voc12", legacy=arch in ("deeplab", "msc")))
    text = deploy_prototxt(cfg, CLASSES, *size)
    prototxt.write_text(text)
    if cfg.msc:
        assert 'type: "Eltwise"' in text and "operation: SUM" in text and "stride: 8" in text

    cv_fc8, cv_interp = opencv_caffe(prototxt, caffemodel, x, [_scores_blob(cfg), "fc8_interp"])
    with torch.no_grad():
        ours = model(x)

    assert_same_scores(ours, cv_fc8)
    assert_same_scores(upsample_scores(ours, cfg), cv_interp[..., cfg.crop_offset:, cfg.crop_offset:], argmax=False)


def test_msc_branches_follow_the_paper() -> None:
    """3×3 → 128 with the stride onto the output grid, 1×1 → 128, own scores; summed with fc8."""
    for arch in ("msc-largefov", "msc"):
        layers = {layer.name: layer for layer in ARCHS[arch].layers(CLASSES)}
        strides = [layers[f"{s}_conv"].stride for s in MSC_SOURCES]
        assert strides == [8, 4, 2, 1, 1]
        assert [layers[f"{s}_conv"].in_channels for s in MSC_SOURCES] == [3, 64, 128, 256, 512]
        assert {(layers[f"{s}_fc"].out_channels, layers[f"{s}_ms"].out_channels) for s in MSC_SOURCES} == {(128, CLASSES)}
        assert layers["fc8_fuse"].kind == "sum" and len(layers["fc8_fuse"].bottoms) == 6
    assert not ARCHS["7x7"].msc and ARCHS["7x7"].fc6 == (7, 4, 12, 4096)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_variant_segments_at_input_resolution(arch: str, photo: np.ndarray) -> None:
    """The pipeline pads to the variant's alignment and crops its upsampled scores back to the image."""
    seg = Segmenter(random_model(narrow(arch), CLASSES), device="cpu", crf=None)
    for h, w in ((75, 113), (33, 20)):
        result = seg.segment(_image(photo, h, w))
        assert result.labels.shape == (h, w) and result.probs.shape == (CLASSES, h, w)


# ---------------------------------------------------------------------------------------------
# Detection from blobs (zero-memory blobs: the 7x7's fc6 alone is 411 MB)


def _caffe_layers(arch: str, legacy: bool, names: dict[str, str] | None = None) -> list[CaffeLayer]:
    """The layers of an architecture's .caffemodel as read back, blobs as zero-stride arrays (no memory)."""
    out = []
    for layer in ARCHS[arch].param_layers(CLASSES):
        shapes = layer.param_shapes()
        bias = (1, 1, 1, layer.out_channels) if legacy else shapes["bias"]
        blobs = [np.broadcast_to(np.float32(0), shapes["weight"]), np.broadcast_to(np.float32(0), bias)]
        out.append(CaffeLayer((names or {}).get(layer.name, caffe_name(layer.name)), "V1:4" if legacy else "Convolution",
                              blobs))
    return out


def _detect(layers: list[CaffeLayer]) -> str | None:
    mapping = map_layers(layers, "m.caffemodel")
    shapes = {}
    for layer in mapping.arch.param_layers(CLASSES):
        caffe = mapping.layers[layer.name]
        shapes[f"{layer.name}.weight"] = torch.empty(_conv_weight(caffe.blobs[0], layer.in_channels).shape, device="meta")
        shapes[f"{layer.name}.bias"] = torch.empty(caffe.blobs[1].size, device="meta")
    return infer_arch(shapes)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("legacy", [True, False], ids=["v1-layers", "layer"])
def test_architecture_is_detected_from_blob_shapes(arch: str, legacy: bool) -> None:
    assert _detect(_caffe_layers(arch, legacy)) == arch


def test_unknown_branch_names_are_mapped_by_order_and_shape() -> None:
    names = {f"{s}_{part}": f"MSc{i}_{part}" for i, s in enumerate(MSC_SOURCES, 1) for part in ("conv", "fc")}
    names |= {f"{s}_ms": f"fc8_MSc{i}" for i, s in enumerate(MSC_SOURCES, 1)}  # even fc8-like score names
    layers = _caffe_layers("msc-largefov", legacy=False, names=names)
    mapping = map_layers(layers, "m.caffemodel")
    assert dict(mapping.by_shape) == names
    assert _detect(layers) == "msc-largefov"


def test_an_unexpected_or_missing_layer_is_named_in_one_line() -> None:
    layers = _caffe_layers("msc", legacy=True)
    extra = layers + [CaffeLayer("fc9_extra", "Convolution", [np.zeros((2, 2, 1, 1), np.float32), np.zeros(2, np.float32)])]
    with pytest.raises(DeeplabError, match=r"^m.caffemodel: does not hold a DeepLab v1 network: "
                                           r"layers that are not DeepLab v1's: fc9_extra$"):
        map_layers(extra, "m.caffemodel")
    without = [layer for layer in layers if layer.name not in ("pool2_fc", "pool3_ms_voc12")]
    with pytest.raises(DeeplabError, match=r"missing layers: pool2_fc, pool3_ms\*$"):
        map_layers(without, "m.caffemodel")


# ---------------------------------------------------------------------------------------------
# Real files through the CLI: MSc-LargeFOV in both layouts, then segment with its own CRF preset


@pytest.fixture(scope="module")
def msc_sd() -> dict[str, torch.Tensor]:
    return random_state_dict("msc-largefov", CLASSES, seed=4)


@pytest.mark.parametrize("legacy", [True, False], ids=["v1-layers", "layer"])
def test_convert_msc_largefov_caffemodel(legacy: bool, msc_sd, tmp_path: Path, photo_file: Path) -> None:
    names = {} if legacy else {"pool4_fc": "fc2_pool4", "data_ms": "fc8_data"}  # names we do not know
    data = caffemodel_bytes(msc_sd, "fc8_voc12", legacy=legacy, rename=names)
    model, out = tmp_path / "train2_iter_8000.caffemodel", tmp_path / "msc.safetensors"
    model.write_bytes(data)
    result = cli("weights", "convert", model, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["arch"], info["classes"]) == ("msc-largefov", CLASSES)
    assert info.get("caffe_by_shape") == (None if legacy else "data_ms=fc8_data, pool4_fc=fc2_pool4")
    weights = load_weights(out)
    assert weights.arch == "msc-largefov" and weights.crf_preset == "msc-largefov"
    assert weights.state_dict.keys() == msc_sd.keys()
    assert all(torch.equal(weights.state_dict[k], v) for k, v in msc_sd.items())
    if legacy:
        return
    # `--crf-preset auto` (the default) takes the architecture's preset; an explicit one wins.
    res = cli("segment", photo_file, "-o", tmp_path / "m.png", "--weights", out, "--device", "cpu",
              "--crf-iterations", "1")
    assert res.exit_code == 0, res.output
    assert "(msc-largefov preset)" in res.stderr and Image.open(tmp_path / "m.png").size == (113, 75)
    res = cli("segment", photo_file, "-o", tmp_path / "n.png", "--weights", out, "--device", "cpu", "--no-crf")
    assert res.exit_code == 0 and "no CRF" in res.stderr
    # A layer that is not DeepLab's: one line, nothing written.
    extra = {"fc9_extra.weight": torch.zeros(2, 2, 1, 1), "fc9_extra.bias": torch.zeros(2)}
    model.write_bytes(data + caffemodel_bytes(extra))  # protobuf: appended messages merge their repeated fields
    line = one_line_error(cli("weights", "convert", model, "-o", tmp_path / "x.safetensors"))
    assert f"{model}: does not hold a DeepLab v1 network: layers that are not DeepLab v1's: fc9_extra" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_crf_preset_recorded_with_the_weights_is_taken(weights_file: Path, tmp_path: Path, photo_file: Path) -> None:
    res = cli("segment", photo_file, "-o", tmp_path / "a.png", "--weights", weights_file, "--device", "cpu",
              "--crf-iterations", "1")
    assert res.exit_code == 0 and "(largefov preset)" in res.stderr
    recorded = tmp_path / "coco.safetensors"
    save_weights(load_weights(weights_file).state_dict, recorded, "largefov", {"crf_preset": "coco-largefov"})
    assert load_weights(recorded).crf_preset == "coco-largefov"
    for preset, shown in (("auto", "coco-largefov"), ("deeplab", "deeplab")):
        res = cli("segment", photo_file, "-o", tmp_path / f"{preset}.png", "--weights", recorded, "--device", "cpu",
                  "--crf-iterations", "1", "--crf-preset", preset)
        assert res.exit_code == 0 and f"({shown} preset)" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# The manifest, `weights list`, `benchmark --arch`


def test_released_variants_are_known_models_with_their_presets(isolated_cache: Path) -> None:
    rows = {r["name"]: r for r in json.loads(cli("weights", "list", "--json").stdout)}
    expected = {"msc-largefov-voc12": ("msc-largefov", "msc-largefov"),
                "coco-largefov-voc12": ("largefov", "coco-largefov"),
                "msc-coco-largefov-voc12": ("msc-largefov", "msc-coco-largefov")}
    for name, (arch, preset) in expected.items():
        row = rows[name]
        assert (row["arch"], row["crf_preset"], row["status"]) == (arch, preset, "not fetched")
        folder = {"msc-largefov": "DeepLab-MSc-LargeFOV", "coco-largefov": "DeepLab-COCO-LargeFOV",
                  "msc-coco-largefov": "DeepLab-MSc-COCO-LargeFOV"}[preset]
        assert row["url"] == f"http://www.cs.jhu.edu/~alanlab/ccvl/{folder}/train2_iter_8000.caffemodel"
        assert row["published_sha256"] is None  # trust on first use
    assert all(r["crf_preset"] in PRESETS for r in rows.values() if r["known"])
    table = cli("weights", "list")
    assert table.exit_code == 0 and "msc-coco-largefov" in table.stdout


def test_benchmark_runs_a_multi_scale_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEEPLAB_WEIGHTS", raising=False)
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    res = cli("benchmark", "--arch", "msc-largefov", "--size", "33x41", "--iters", "1", "--warmup", "0",
              "--device", "cpu", "--no-variants", "--crf-iterations", "1", "--json")
    assert res.exit_code == 0, res.stderr
    env = json.loads(res.stdout)["environment"]
    assert (env["arch"], env["crf_preset"], env["input_size"]) == ("msc-largefov", "msc-largefov", [33, 41])
    with torch.device("meta"):
        assert DeepLab("msc-largefov").conv_flops(33, 41) > DeepLab("largefov").conv_flops(33, 41)
