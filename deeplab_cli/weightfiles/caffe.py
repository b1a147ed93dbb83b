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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..archs import Layer
from ..errors import DeeplabError, UsageError
from ..model import ARCHS, LAYER_ORDER, check_shapes, expected_shapes, get_arch, infer_arch
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


def _our_layer(name: str) -> str | None:
    if name in LAYER_ORDER:
        return name
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


def caffe_state_dict(layers: list[CaffeLayer], source: str = "<caffemodel>") -> tuple[dict[str, torch.Tensor], str]:
    """Map Caffe layers onto our keys by name (conv1_1 … fc7, any fc8* → fc8); also return the fc8 layer's name."""
    found: dict[str, CaffeLayer] = {}
    unknown = []
    fc8_names = [layer.name for layer in layers if _our_layer(layer.name) == "fc8"]
    if len(fc8_names) > 1:
        raise DeeplabError(f"{source}: several fc8 layers ({', '.join(fc8_names)}); cannot tell which one to use")
    for layer in layers:
        ours = _our_layer(layer.name)
        if ours is None:
            unknown.append(layer.name)
        elif ours in found:
            raise DeeplabError(f"{source}: layer {layer.name!r} appears twice")
        else:
            found[ours] = layer
    missing = [("fc8*" if n == "fc8" else n) for n in LAYER_ORDER if n not in found]
    if missing or unknown:
        parts = [f"missing layers: {', '.join(missing)}"] if missing else []
        if unknown:
            more = " …" if len(unknown) > 8 else ""
            parts.append(f"layers that are not DeepLab v1's: {', '.join(unknown[:8])}{more}")
        raise DeeplabError(f"{source}: does not hold a DeepLab v1 network: {'; '.join(parts)}")
    sd: dict[str, torch.Tensor] = {}
    in_channels = 3
    for name in LAYER_ORDER:
        layer = found[name]
        if len(layer.blobs) != 2:
            raise DeeplabError(f"{source}: layer {layer.name!r} has {len(layer.blobs)} blobs, expected weight and bias")
        weight = _conv_weight(layer.blobs[0], in_channels)
        sd[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        sd[f"{name}.bias"] = torch.from_numpy(layer.blobs[1].reshape(-1).copy())  # old files: [1, 1, 1, n]
        in_channels = weight.shape[0]
    return sd, found["fc8"].name


def load_caffemodel(path: str | os.PathLike, arch: str | None = None) -> Weights:
    """Read and check a .caffemodel; arch defaults to the one fc6's shape identifies."""
    path = Path(path)
    sd, fc8_name = caffe_state_dict(read_caffemodel(path), str(path))
    if arch is None:
        arch = infer_arch(sd)
        if arch is None:
            fits = "; ".join(f"{n}: {list(s)}" for n, s in _fc6_shapes().items())
            raise DeeplabError(
                f"{path}: fc6 is {list(sd['fc6.weight'].shape)}, which fits no known architecture ({fits})"
            )
    arch = get_arch(arch).name
    num_classes = int(sd["fc8.weight"].shape[0])
    check_shapes(sd, arch, num_classes, source=str(path))
    metadata = {
        "source": path.name, "source_sha256": sha256_file(path), "source_format": "caffemodel", "caffe_fc8": fc8_name,
    }
    return Weights(sd, arch, num_classes, metadata, path)


def _fc6_shapes() -> dict[str, tuple[int, ...]]:
    return {name: expected_shapes(name)["fc6.weight"] for name in ARCHS}


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


def caffe_name(layer: Layer, fc8_name: str = "fc8_voc12") -> str:
    """A layer's name in the authors' Caffe files: the class-score layer carries the model's suffix (fc8_voc12)."""
    return fc8_name if layer.scores else layer.name


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
    return ""


_PROTOTXT_TYPES = {"conv": "Convolution", "relu": "ReLU", "dropout": "Dropout", "max_pool": "Pooling",
                   "ave_pool": "Pooling"}


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
    names = {layer.top: caffe_name(layer, fc8_name) for layer in layers if layer.scores}  # fc8 → fc8_voc12
    lines = [f'name: "DeepLab-{cfg.name}"', 'input: "data"',
             f"input_shape {{ dim: 1 dim: 3 dim: {height} dim: {width} }}"]

    def add(name: str, type_: str, bottoms: list[str], top: str, params: str = "") -> None:
        fields = "".join(f' bottom: "{b}"' for b in bottoms) + f' top: "{top}"' + (f" {params}" if params else "")
        lines.append(f'layer {{ name: "{name}" type: "{type_}"{fields} }}')

    for layer in layers:
        add(caffe_name(layer, fc8_name), _PROTOTXT_TYPES[layer.kind], [names.get(b, b) for b in layer.bottoms],
            names.get(layer.top, layer.top), _prototxt_params(layer))
    if interp:
        scores = names.get(layers[-1].top, layers[-1].top)
        add("fc8_interp", "Interp", [scores], "fc8_interp", f"interp_param {{ zoom_factor: {cfg.output_stride} }}")
    return "\n".join(lines) + "\n"
