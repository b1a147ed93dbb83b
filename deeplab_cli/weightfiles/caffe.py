"""Caffe model files without Caffe: read the authors' `.caffemodel` into our state dict (`deeplab weights
convert`), and write the deploy prototxt of an architecture.

Only the few protobuf messages and fields that carry weights are declared (names and field numbers
from Caffe's caffe.proto); every other field of a file is skipped as unknown. Both the current
`layer` list and the legacy V1 `layers` list are read, and blobs with a `shape` as well as the
legacy num/channels/height/width. `messages(raw=True)` declares the float payload as `bytes` (a packed
`repeated float` has the same wire format), which lets deeplab_cli.testing write .caffemodels without
building millions of Python floats.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..archs import MSC_WIDTH, ArchConfig, Layer
from ..errors import DeeplabError, UsageError
from ..model import ARCHS, check_shapes, expected_shapes, get_arch, infer_arch
from .cache import sha256_file
from .formats import Weights, save_weights

# V1LayerParameter.LayerType code of a convolution (caffe.proto), what the authors' old files hold.
V1_CONVOLUTION = 4

_F = SimpleNamespace(
    OPTIONAL=1, REPEATED=3,  # FieldDescriptorProto.Label
    DOUBLE=1, FLOAT=2, INT64=3, INT32=5, STRING=9, MESSAGE=11, BYTES=12,  # FieldDescriptorProto.Type
)


def _message_specs(raw: bool) -> dict[str, list[tuple]]:
    """(field name, number, label, type, message type name) of every declared field, per message."""
    data = (_F.REPEATED, _F.BYTES) if raw else (_F.REPEATED, _F.FLOAT)
    double_data = (_F.REPEATED, _F.BYTES) if raw else (_F.REPEATED, _F.DOUBLE)
    return {
        "BlobShape": [("dim", 1, _F.REPEATED, _F.INT64, None)],
        "BlobProto": [
            ("num", 1, _F.OPTIONAL, _F.INT64, None),
            ("channels", 2, _F.OPTIONAL, _F.INT64, None),
            ("height", 3, _F.OPTIONAL, _F.INT64, None),
            ("width", 4, _F.OPTIONAL, _F.INT64, None),
            ("data", 5, *data, None),
            ("shape", 7, _F.OPTIONAL, _F.MESSAGE, "BlobShape"),
            ("double_data", 8, *double_data, None),
        ],
        "LayerParameter": [
            ("name", 1, _F.OPTIONAL, _F.STRING, None),
            ("type", 2, _F.OPTIONAL, _F.STRING, None),
            ("bottom", 3, _F.REPEATED, _F.STRING, None),
            ("top", 4, _F.REPEATED, _F.STRING, None),
            ("blobs", 7, _F.REPEATED, _F.MESSAGE, "BlobProto"),
        ],
        "V1LayerParameter": [
            ("bottom", 2, _F.REPEATED, _F.STRING, None),
            ("top", 3, _F.REPEATED, _F.STRING, None),
            ("name", 4, _F.OPTIONAL, _F.STRING, None),
            # An enum in caffe.proto; int32 has the same wire format and keeps the codes that
            # DeepLab's Caffe fork added (INTERP, ...) readable.
            ("type", 5, _F.OPTIONAL, _F.INT32, None),
            ("blobs", 6, _F.REPEATED, _F.MESSAGE, "BlobProto"),
        ],
        "NetParameter": [
            ("name", 1, _F.OPTIONAL, _F.STRING, None),
            ("layers", 2, _F.REPEATED, _F.MESSAGE, "V1LayerParameter"),
            ("layer", 100, _F.REPEATED, _F.MESSAGE, "LayerParameter"),
        ],
    }


@functools.cache
def messages(raw: bool = False) -> SimpleNamespace:
    """Message classes NetParameter, LayerParameter, V1LayerParameter, BlobProto, BlobShape.

    raw=False declares BlobProto.data/double_data as Caffe does (`repeated float` / `repeated double`:
    packed or not, both parse); raw=True as `repeated bytes`, to write a packed payload from a buffer.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    package = "deeplab_cli.caffe_raw" if raw else "deeplab_cli.caffe"
    file_name = f"{package.replace('.', '/')}.proto"
    fdp = descriptor_pb2.FileDescriptorProto(name=file_name, package=package, syntax="proto2")
    for message_name, fields in _message_specs(raw).items():
        message = fdp.message_type.add(name=message_name)
        for name, number, label, ftype, type_name in fields:
            f = message.field.add(name=name, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = f".{package}.{type_name}"
            if label == _F.REPEATED and ftype not in (_F.STRING, _F.BYTES, _F.MESSAGE):
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return SimpleNamespace(**{n: get(pool.FindMessageTypeByName(f"{package}.{n}")) for n in _message_specs(raw)})


@dataclass
class CaffeLayer:
    """One layer of a .caffemodel that holds parameters: its name, type and blobs (float32 arrays)."""

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)


def _blob_shape(blob) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def _blob_array(blob, where: str) -> np.ndarray:
    """A BlobProto → float32 array of its declared shape."""
    shape = _blob_shape(blob)
    count = int(np.prod(shape)) if shape else 0
    values = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if values.size != count:
        raise DeeplabError(f"{where} holds {values.size} values, but its shape {list(shape)} needs {count}")
    return values.reshape(shape)


def parse_caffemodel(data: bytes, source: str = "<caffemodel>") -> list[CaffeLayer]:
    """The layers with parameters of a serialized NetParameter, in file order (V1 `layers` first)."""
    from google.protobuf.message import DecodeError

    try:
        net = messages().NetParameter.FromString(data)
    except (DecodeError, RecursionError, ValueError):
        raise DeeplabError(f"{source}: not a Caffe model, or a truncated one (its protobuf does not parse)") from None
    layers = []
    for v1, layer in [(True, x) for x in net.layers] + [(False, x) for x in net.layer]:
        if not layer.blobs:
            continue
        where = f"{source}: layer {layer.name!r} blob"
        blobs = [_blob_array(b, f"{where} {i}") for i, b in enumerate(layer.blobs)]
        layers.append(CaffeLayer(layer.name, f"V1:{layer.type}" if v1 else layer.type, blobs))
    return layers


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """Read a .caffemodel file: the layers that hold parameters, with float32 blobs."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise DeeplabError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise DeeplabError(f"{path}: empty file, not a Caffe model")
    return parse_caffemodel(data, str(path))


_KNOWN_LAYERS = frozenset(layer.name for cfg in ARCHS.values() for layer in cfg.param_layers())
_BRANCH_SCORES = re.compile(r"^(data|pool[1-4])_ms")


def _our_layer(name: str) -> str | None:
    """Our layer for a Caffe layer name: the same name, any {source}_ms* → {source}_ms, any fc8* → fc8; else None."""
    if name in _KNOWN_LAYERS:
        return name
    match = _BRANCH_SCORES.match(name)
    if match:
        return f"{match.group(1)}_ms"
    return "fc8" if name.startswith("fc8") else None


def _conv_weight(blob: np.ndarray, in_channels: int) -> np.ndarray:
    """A weight blob as (out, in, kh, kw); InnerProduct-style (out, in·k·k) and (1, 1, out, in·k·k) are reshaped."""
    if blob.ndim == 4 and blob.shape[:2] == (1, 1) and blob.shape[3] % in_channels == 0 and in_channels > 1:
        blob = blob.reshape(blob.shape[2:])
    if blob.ndim == 2 and blob.shape[1] % in_channels == 0:
        k = round((blob.shape[1] // in_channels) ** 0.5)
        if k * k * in_channels == blob.shape[1]:
            return blob.reshape(blob.shape[0], in_channels, k, k)
    return blob


def _weight_in_channels(layer: CaffeLayer) -> int | None:
    """Input channels of a 1×1 layer's weight blob (weight size ÷ bias size), or None without two blobs."""
    if len(layer.blobs) != 2 or not layer.blobs[1].size:
        return None
    return layer.blobs[0].size // layer.blobs[1].size


def _fits(candidate: CaffeLayer, layer: Layer) -> bool:
    """True when a Caffe layer's blobs have the shapes of our layer's weight and bias."""
    if len(candidate.blobs) != 2 or candidate.blobs[1].size != layer.out_channels:
        return False
    return _conv_weight(candidate.blobs[0], layer.in_channels).shape == layer.param_shapes()["weight"]


@dataclass
class LayerMap:
    """Which Caffe layer gives each of our layers with parameters, for one architecture."""

    arch: ArchConfig
    layers: dict[str, CaffeLayer]  # our layer name → Caffe layer, in network order
    by_shape: list[tuple[str, str]] = field(default_factory=list)  # (ours, theirs) matched by order and shape


def map_layers(layers: list[CaffeLayer], source: str = "<caffemodel>", arch: str | None = None) -> LayerMap:
    """Map a .caffemodel's layers onto an architecture's: by name (conv1_1 … fc7, fc8* → fc8, the MSc branches'
    {source}_conv, {source}_fc, {source}_ms*), then layers of other names by order and blob shape.

    Without arch, the architectures with as many layers as the file are tried first. When none fits, a
    DeeplabError names, in one line, the layers missing and those left without a place for the architecture
    that came closest.
    """
    fc8s = [layer for layer in layers if _our_layer(layer.name) == "fc8"]
    if len(fc8s) > 1:  # a branch's scores named fc8_…: the main fc8 is the one not fed by a 128-channel branch
        main = [layer for layer in fc8s if _weight_in_channels(layer) != MSC_WIDTH]
        if len(main) != 1:
            raise DeeplabError(f"{source}: several fc8 layers ({', '.join(x.name for x in fc8s)}); "
                               "cannot tell which one to use")
        fc8s = main
    named: dict[str, CaffeLayer] = {}
    unnamed: list[CaffeLayer] = []
    for layer in layers:
        ours = _our_layer(layer.name)
        if ours is None or (ours == "fc8" and layer is not fc8s[0]):
            unnamed.append(layer)
        elif ours in named:
            raise DeeplabError(f"{source}: layer {layer.name!r} appears twice")
        else:
            named[ours] = layer
    num_classes = named["fc8"].blobs[-1].size if "fc8" in named and named["fc8"].blobs else 0
    candidates = ([get_arch(arch)] if arch else
                  sorted(ARCHS.values(), key=lambda cfg: len(cfg.param_layers()) != len(layers)))
    problems = []
    for cfg in candidates:
        expected = cfg.param_layers(max(num_classes, 1))
        found = {layer.name: named[layer.name] for layer in expected if layer.name in named}
        extra = [layer.name for ours, layer in named.items() if ours not in found]
        left, by_shape = list(unnamed), []
        for layer in expected:
            match = None if layer.name in found else next((c for c in left if _fits(c, layer)), None)
            if match is not None:
                found[layer.name] = match
                left.remove(match)
                by_shape.append((layer.name, match.name))
        missing = [layer.name for layer in expected if layer.name not in found]
        if not (missing or extra or left):
            return LayerMap(cfg, {layer.name: found[layer.name] for layer in expected}, by_shape)
        problems.append((missing, [layer.name for layer in layers if layer.name in extra or layer in left]))
    missing, unknown = min(problems, key=lambda p: len(p[0]) + len(p[1]))
    parts = []
    if missing:  # names with a suffix in Caffe files (fc8_voc12) are shown as fc8*
        parts.append(f"missing layers: {', '.join(caffe_name(n, 'fc8*') for n in missing)}")
    if unknown:
        more = " …" if len(unknown) > 8 else ""
        parts.append(f"layers that are not DeepLab v1's: {', '.join(unknown[:8])}{more}")
    raise DeeplabError(f"{source}: does not hold a DeepLab v1 network: {'; '.join(parts)}")


def _state_dict(mapping: LayerMap, source: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for layer in mapping.arch.param_layers():
        caffe = mapping.layers[layer.name]
        if len(caffe.blobs) != 2:
            raise DeeplabError(f"{source}: layer {caffe.name!r} has {len(caffe.blobs)} blobs, expected weight and bias")
        weight = _conv_weight(caffe.blobs[0], layer.in_channels)
        sd[f"{layer.name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        sd[f"{layer.name}.bias"] = torch.from_numpy(caffe.blobs[1].reshape(-1).copy())  # old files: [1, 1, 1, n]
    return sd


def caffe_state_dict(layers: list[CaffeLayer], source: str = "<caffemodel>", arch: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], str]:
    """Our state dict from a .caffemodel's layers (mapped by map_layers); also return the fc8 layer's name."""
    mapping = map_layers(layers, source, arch)
    return _state_dict(mapping, source), mapping.layers["fc8"].name


def load_caffemodel(path: str | os.PathLike, arch: str | None = None) -> Weights:
    """Read and check a .caffemodel; arch defaults to the one its layers and fc6's shape identify."""
    path = Path(path)
    mapping = map_layers(read_caffemodel(path), str(path), arch)
    sd = _state_dict(mapping, str(path))
    if arch is None:
        arch = infer_arch(sd)
        if arch is None:
            fits = "; ".join(f"{n}: {list(s)}" for n, s in _fc6_shapes(mapping.arch).items())
            raise DeeplabError(
                f"{path}: fc6 is {list(sd['fc6.weight'].shape)}, which fits no known architecture ({fits})"
            )
    arch = get_arch(arch).name
    num_classes = int(sd["fc8.weight"].shape[0])
    check_shapes(sd, arch, num_classes, source=str(path))
    metadata = {
        "source": path.name, "source_sha256": sha256_file(path), "source_format": "caffemodel",
        "caffe_fc8": mapping.layers["fc8"].name,
    }
    if mapping.by_shape:
        metadata["caffe_by_shape"] = ", ".join(f"{ours}={theirs}" for ours, theirs in mapping.by_shape)
    return Weights(sd, arch, num_classes, metadata, path)


def _fc6_shapes(like: ArchConfig) -> dict[str, tuple[int, ...]]:
    """fc6's shape in each architecture with the same layers as `like` (single-scale or multi-scale)."""
    return {name: expected_shapes(name)["fc6.weight"] for name, cfg in ARCHS.items() if cfg.msc == like.msc}


def convert_caffemodel(src: str | os.PathLike, dst: str | os.PathLike, arch: str | None = None) -> Weights:
    """Convert a .caffemodel to .safetensors (written atomically) with arch, classes, source name and sha256."""
    src, dst = Path(src), Path(dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: refusing to overwrite the input file")
    weights = load_caffemodel(src, arch)
    save_weights(weights.state_dict, dst, weights.arch, weights.metadata)
    weights.path = dst
    return weights


# ---------------------------------------------------------------------------------------------
# A deploy prototxt for an architecture: lets Caffe or OpenCV (cv2.dnn.readNetFromCaffe) run the same network
# as ours on a converted model (the tests' independent check). deeplab_cli.testing writes matching .caffemodels.


def caffe_name(name: str, fc8_name: str = "fc8_voc12") -> str:
    """Our layer name → its name in the authors' Caffe files, where class-score layers carry the model's suffix:
    fc8 → fc8_voc12, pool1_ms → pool1_ms_voc12 (the inverse of _our_layer)."""
    if name == "fc8":
        return fc8_name
    return name + fc8_name.removeprefix("fc8") if _BRANCH_SCORES.match(name) else name


def _prototxt_params(layer: Layer) -> str:
    if layer.kind == "conv":
        extra = "".join(f" {key}: {value}" for key, value, default in
                        (("stride", layer.stride, 1), ("pad", layer.pad, 0), ("dilation", layer.dilation, 1))
                        if value != default)
        return f"convolution_param {{ num_output: {layer.out_channels} kernel_size: {layer.kernel}{extra} }}"
    if layer.kind in ("max_pool", "ave_pool"):
        pool = "MAX" if layer.kind == "max_pool" else "AVE"
        return (f"pooling_param {{ pool: {pool} kernel_size: {layer.kernel} stride: {layer.stride} "
                f"pad: {layer.pad} }}")
    if layer.kind == "dropout":
        return "dropout_param { dropout_ratio: 0.5 }"
    if layer.kind == "crop":
        return "crop_param { axis: 2 offset: 0 }"
    if layer.kind == "sum":
        return "eltwise_param { operation: SUM }"
    return ""


_PROTOTXT_TYPES = {"conv": "Convolution", "relu": "ReLU", "dropout": "Dropout", "max_pool": "Pooling",
                   "ave_pool": "Pooling", "crop": "Crop", "sum": "Eltwise"}


def deploy_prototxt(
    arch: str = "largefov",
    num_classes: int = 21,
    height: int = 513,
    width: int = 513,
    fc8_name: str = "fc8_voc12",
    interp: bool = True,
) -> str:
    """A deploy prototxt (current Caffe syntax, `dilation` for the authors' `hole`) for an input of height × width.

    With interp, a final Interp layer (zoom 8, corner-aligned) gives the upsampled scores `fc8_interp`;
    the original DeepLab's crop of 7 at the start is left to the reader (transforms.upsample_scores does it).
    """
    cfg = get_arch(arch)
    layers = cfg.layers(num_classes)
    names = {layer.top: caffe_name(layer.name, fc8_name) for layer in layers if layer.has_params}  # fc8 → fc8_voc12
    lines = [f'name: "DeepLab-{cfg.name}"', 'input: "data"',
             f"input_shape {{ dim: 1 dim: 3 dim: {height} dim: {width} }}"]

    def add(name: str, type_: str, bottoms: list[str], top: str, params: str = "") -> None:
        fields = "".join(f' bottom: "{b}"' for b in bottoms) + f' top: "{top}"' + (f" {params}" if params else "")
        lines.append(f'layer {{ name: "{name}" type: "{type_}"{fields} }}')

    for layer in layers:
        add(caffe_name(layer.name, fc8_name), _PROTOTXT_TYPES[layer.kind], [names.get(b, b) for b in layer.bottoms],
            names.get(layer.top, layer.top), _prototxt_params(layer))
    if interp:
        scores = names.get(layers[-1].top, layers[-1].top)
        add("fc8_interp", "Interp", [scores], "fc8_interp", f"interp_param {{ zoom_factor: {cfg.output_stride} }}")
    return "\n".join(lines) + "\n"
