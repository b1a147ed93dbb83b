"""Caffe import/export, checked against OpenCV's independent Caffe implementation and the authors' prototxts."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import assert_same_scores, cli, one_line_error, opencv_caffe
from PIL import Image

from deeplab_cli.errors import DeeplabError
from deeplab_cli.testing import caffemodel_bytes, random_state_dict, write_caffemodel
from deeplab_cli.transforms import padded_size, preprocess, to_tensor, upsample_scores
from deeplab_cli.weightfiles.cache import sha256_file
from deeplab_cli.weightfiles.caffe import (
    CaffeLayer,
    _blob_array,
    _conv_weight,
    caffe_state_dict,
    deploy_prototxt,
    load_caffemodel,
    messages,
    parse_caffemodel,
)
from deeplab_cli.weightfiles.formats import build_model, load_weights

DATA = Path(__file__).parent / "data"
REFERENCE = {"largefov": DATA / "DeepLab-LargeFOV_test.prototxt", "deeplab": DATA / "DeepLab_basic_test.prototxt"}


@pytest.fixture(scope="module")
def largefov_sd() -> dict[str, torch.Tensor]:
    return random_state_dict("largefov", seed=3)


@pytest.fixture(scope="module")
def legacy_bytes(largefov_sd) -> bytes:
    """A LargeFOV caffemodel in the authors' old layout: V1 `layers`, num/channels/height/width, biases [1, 1, 1, n]."""
    return caffemodel_bytes(largefov_sd, "fc8_voc12", legacy=True)


# ---------------------------------------------------------------------------------------------
# Reading and writing


@pytest.mark.parametrize("legacy", [True, False], ids=["v1-layers", "layer"])
def test_caffemodel_round_trip_is_exact(largefov_sd, legacy_bytes, legacy):
    data = legacy_bytes if legacy else caffemodel_bytes(largefov_sd, "fc8_voc12", legacy=False)
    layers = parse_caffemodel(data)
    assert [layer.name for layer in layers][-3:] == ["fc6", "fc7", "fc8_voc12"]
    assert layers[0].type == ("V1:4" if legacy else "Convolution")
    if legacy:
        assert layers[0].blobs[1].shape == (1, 1, 1, 64)  # bias as old Caffe stored it
    sd, fc8 = caffe_state_dict(layers)
    assert fc8 == "fc8_voc12"
    assert sd.keys() == largefov_sd.keys()
    for key, value in largefov_sd.items():
        assert torch.equal(sd[key], value), key


def test_raw_payload_is_caffes_packed_encoding():
    """Writing the payload as bytes gives exactly the bytes of Caffe's `repeated float [packed = true]`."""
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    raw = messages(raw=True).BlobProto(num=1, channels=1, height=1, width=1000, data=[values.tobytes()])
    typed = messages(raw=False).BlobProto(num=1, channels=1, height=1, width=1000, data=values.tolist())
    assert raw.SerializeToString() == typed.SerializeToString()


def test_unpacked_and_double_blobs_are_read():
    shape = messages().BlobShape(dim=[2, 3]).SerializeToString()
    header = b"\x3a" + bytes([len(shape)]) + shape  # field 7 (shape), length-delimited
    values = np.arange(6, dtype=np.float32)
    unpacked = header + b"".join(b"\x2d" + struct.pack("<f", v) for v in values)  # field 5, one fixed32 each
    blob = messages().BlobProto.FromString(unpacked)
    assert np.array_equal(_blob_array(blob, "blob"), values.reshape(2, 3))
    double = messages().BlobProto(shape={"dim": [6]}, double_data=values.astype(np.float64).tolist())
    blob = messages().BlobProto.FromString(double.SerializeToString())
    assert np.array_equal(_blob_array(blob, "blob"), values)


def test_inner_product_weights_are_reshaped():
    w = np.arange(4 * 8 * 9, dtype=np.float32).reshape(4, 72)
    assert _conv_weight(w, 8).shape == (4, 8, 3, 3)
    assert _conv_weight(w.reshape(1, 1, 4, 72), 8).shape == (4, 8, 3, 3)
    assert np.array_equal(_conv_weight(w, 8).reshape(4, 72), w)


def test_load_caffemodel_infers_arch_and_records_source(tmp_path, legacy_bytes, largefov_sd):
    path = tmp_path / "train2_iter_8000.caffemodel"
    path.write_bytes(legacy_bytes)
    w = load_caffemodel(path)
    assert (w.arch, w.num_classes) == ("largefov", 21)
    assert w.metadata["source"] == "train2_iter_8000.caffemodel"
    assert w.metadata["source_sha256"] == sha256_file(path)
    with pytest.raises(DeeplabError, match="does not fit the deeplab architecture.*fc6.weight"):
        load_caffemodel(path, arch="deeplab")


def test_missing_unknown_and_duplicate_layers_are_named(largefov_sd):
    layers = parse_caffemodel(caffemodel_bytes(largefov_sd))
    without = [layer for layer in layers if layer.name not in ("conv3_1", "fc8_voc12")]
    with pytest.raises(DeeplabError, match=r"missing layers: conv3_1, fc8\*"):
        caffe_state_dict(without, "m.caffemodel")
    extra = layers + [CaffeLayer("fc9_extra", "Convolution", [np.zeros((2, 2, 1, 1), np.float32)])]
    with pytest.raises(DeeplabError, match="not DeepLab v1's: fc9_extra"):
        caffe_state_dict(extra, "m.caffemodel")
    two_heads = layers + [CaffeLayer("fc8_pascal", "Convolution", layers[-1].blobs)]
    with pytest.raises(DeeplabError, match="several fc8 layers"):
        caffe_state_dict(two_heads, "m.caffemodel")


@pytest.mark.parametrize(
    "key,shape,message",
    [
        ("fc7.weight", (1024, 1024, 3, 3), "does not fit the largefov architecture: "
         "fc7.weight is [1024, 1024, 3, 3], expected [1024, 1024, 1, 1]"),
        ("fc6.weight", (1024, 512, 5, 5), "fc6 is [1024, 512, 5, 5], which fits no known architecture "
         "(largefov: [1024, 512, 3, 3]; deeplab: [4096, 512, 4, 4]; 7x7: [4096, 512, 7, 7])"),
    ],
)
def test_mismatched_shapes_are_listed(tmp_path, largefov_sd, key, shape, message):
    sd = {**largefov_sd, key: torch.zeros(shape)}
    path = tmp_path / "bad.caffemodel"
    write_caffemodel(sd, path)
    line = one_line_error(cli("weights", "convert", path, "-o", tmp_path / "out.safetensors"))
    assert f"{path}: {message}" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_and_random_files_fail_in_one_line(tmp_path, legacy_bytes):
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(legacy_bytes[: len(legacy_bytes) // 2])
    random_file = tmp_path / "random.caffemodel"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, random_file):
        for args in (("weights", "convert", path, "-o", tmp_path / "o.safetensors"), ("weights", "info", path)):
            line = one_line_error(cli(*args))
            assert str(path) in line and "not a Caffe model, or a truncated one" in line
    empty = tmp_path / "empty.caffemodel"
    empty.touch()
    assert "empty file" in one_line_error(cli("weights", "convert", empty, "-o", tmp_path / "o.safetensors"))


def test_deploy_prototxt_matches_the_authors_networks():
    """Our deploy net (from the architecture table) has the authors' layer parameters, `hole` read as dilation."""

    def layer_params(text: str) -> dict[str, dict[str, str]]:
        text = re.sub(r"#[^\n]*", "", text)
        out = {}
        for block in re.split(r"\blayers? \{", text)[1:]:
            pairs = re.findall(r"(\w+):\s*(\"[^\"]*\"|[\w.${}-]+)", block)
            d = {k: v.strip('"') for k, v in pairs if k not in ("bottom", "top")}
            name = d.pop("name", "")
            if re.match(r"(conv\d_\d|pool\da?|fc[67])$", name):
                keys = ("num_output", "pad", "kernel_size", "stride", "pool", "hole", "dilation")
                d = {k: v for k, v in d.items() if k in keys}
                if "hole" in d:
                    d["dilation"] = d.pop("hole")
                out[name] = d
        return out

    for arch, reference in REFERENCE.items():
        ours = layer_params(deploy_prototxt(arch))
        theirs = layer_params(reference.read_text())
        assert len(theirs) >= 20
        assert ours.keys() == theirs.keys(), arch
        for name in theirs:
            # Caffe defaults: stride 1, pad 0, dilation 1.
            defaults = {"stride": "1", "pad": "0", "dilation": "1"}
            assert {**defaults, **ours[name]} == {**defaults, **theirs[name]}, (arch, name)


# ---------------------------------------------------------------------------------------------
# Equal numbers: OpenCV's Caffe implementation vs our converted model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per architecture: (folder, caffemodel path, converted Weights, our model) — converted through the CLI."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"caffe-{arch}")
            model = root / f"{arch}.caffemodel"
            # The original DeepLab in the old V1 layout, LargeFOV in the current one: both readers are exercised.
            write_caffemodel(random_state_dict(arch, seed=7), model, "fc8_voc12", legacy=arch == "deeplab")
            out = root / f"{arch}.safetensors"
            result = cli("weights", "convert", model, "-o", out)
            assert result.exit_code == 0, result.output
            weights = load_weights(out)
            cache[arch] = (root, model, weights, build_model(weights))
        return cache[arch]

    return get


def _image(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(photo).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize(
    "arch,height,width,pad",
    [
        ("largefov", 45, 61, False),  # sides not 8k+1: Caffe's ceil-mode pooling decides the sizes
        ("largefov", 60, 50, True),  # padded to 65×57 = 8k+1, as the pipeline does
        ("deeplab", 45, 61, False),
        ("deeplab", 60, 50, True),  # padded to 66×50 = 16k+2
    ],
)
def test_scores_equal_opencv_caffe(converted, photo, arch, height, width, pad):
    root, caffemodel, weights, model = converted(arch)
    assert weights.arch == arch and weights.metadata["source_sha256"] == sha256_file(caffemodel)
    image = _image(photo, height, width)
    size = padded_size(height, width, arch) if pad else (height, width)
    x = preprocess(to_tensor(image)[None], size)  # (1, 3, H', W') BGR minus mean
    prototxt = root / f"{arch}_{size[0]}x{size[1]}.prototxt"
    prototxt.write_text(deploy_prototxt(arch, 21, *size))

    cv_fc8, cv_interp = opencv_caffe(prototxt, caffemodel, x, ["fc8_voc12", "fc8_interp"])
    with torch.no_grad():
        ours = model(x)

    assert_same_scores(ours, cv_fc8)
    # Caffe's ×8 Interp (corners aligned); the original DeepLab then drops 7 pixels at the start.
    up = upsample_scores(ours, arch)
    offset = {"largefov": 0, "deeplab": 7}[arch]
    assert_same_scores(up, cv_interp[..., offset:, offset:], argmax=False)


def test_convert_once_then_segment_gives_caffes_probabilities(converted, photo_file, tmp_path, monkeypatch):
    """The user's path: `weights convert` (into the cache) → `segment`; its saved probabilities equal OpenCV-Caffe's."""
    from deeplab_cli.io import read_image

    root, caffemodel, _, _ = converted("largefov")
    monkeypatch.setenv("DEEPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPLAB_WEIGHTS", raising=False)
    result = cli("weights", "convert", caffemodel)
    assert result.exit_code == 0 and "uses it by default" in result.stderr, result.output
    probs_file = tmp_path / "probs.npy"
    result = cli("segment", photo_file, "-o", tmp_path / "mask.png", "--no-crf", "--save-probs", probs_file,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    probs = np.load(probs_file)

    image = read_image(photo_file)
    height, width = image.shape[:2]
    size = padded_size(height, width, "largefov")
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(deploy_prototxt("largefov", 21, *size))
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(preprocess(to_tensor(image)[None], size).numpy())
    caffe_probs = torch.softmax(torch.from_numpy(net.forward("fc8_interp"))[0, :, :height, :width], dim=0).numpy()
    assert probs.shape == caffe_probs.shape == (21, height, width)
    assert np.abs(probs - caffe_probs).max() <= 1e-3  # random weights give large scores: ~1e-6 relative
    assert np.array_equal(probs.argmax(0), caffe_probs.argmax(0))
