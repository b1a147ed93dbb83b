"""Caffe model files without Caffe: read the authors' `.caffemodel` into our state dict, and write one back.

Only the few protobuf messages and fields that carry weights are declared (names and field numbers
from Caffe's caffe.proto); every other field of a file is skipped as unknown. Both the current
`layer` list and the legacy V1 `layers` list are read, and blobs with a `shape` as well as the
legacy num/channels/height/width. Writing declares the float payload as `bytes` (a packed
`repeated float` has the same wire format), which spares building millions of Python floats.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import DeeplabError, UsageError
from .model import ARCHS, VGG16_WIDTHS, get_arch
from .weights import LAYER_ORDER, Weights, check_shapes, infer_arch, save_weights, sha256_file

# V1LayerParameter.LayerType codes of the layers a deploy net uses (caffe.proto).
V1_CONVOLUTION, V1_DROPOUT, V1_POOLING, V1_RELU = 4, 6, 17, 18

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
    return {n: (c.fc6[3], VGG16_WIDTHS[-1][-1], c.fc6[0], c.fc6[0]) for n, c in ARCHS.items()}


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
# Writing: a .caffemodel from a state dict and a deploy prototxt for an architecture. They let
# Caffe or OpenCV (cv2.dnn.readNetFromCaffe) run the same network as ours.


def caffemodel_bytes(sd: dict[str, torch.Tensor], fc8_name: str = "fc8_voc12", legacy: bool = False) -> bytes:
    """Serialize our state dict as a NetParameter: new-style `layer`s with blob shapes, or legacy V1 `layers`
    with num/channels/height/width blobs and biases stored [1, 1, 1, n] (as the authors' old files do)."""
    net = messages(raw=True).NetParameter(name="DeepLab")
    for name in LAYER_ORDER:
        layer = net.layers.add() if legacy else net.layer.add()
        layer.name = fc8_name if name == "fc8" else name
        layer.type = V1_CONVOLUTION if legacy else "Convolution"
        for key in ("weight", "bias"):
            arr = sd[f"{name}.{key}"].detach().to("cpu", torch.float32).contiguous().numpy()
            blob = layer.blobs.add()
            if legacy:
                blob.num, blob.channels, blob.height, blob.width = arr.shape if arr.ndim == 4 else (1, 1, 1, arr.size)
            else:
                blob.shape.dim.extend(arr.shape)
            blob.data.append(arr.astype("<f4").tobytes())
    return net.SerializeToString()


def write_caffemodel(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, fc8_name: str = "fc8_voc12", legacy: bool = False
) -> None:
    """Write our state dict as a .caffemodel (atomically); see caffemodel_bytes for the two layouts."""
    from .io import write_bytes

    write_bytes(path, caffemodel_bytes(sd, fc8_name, legacy))


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
    lines = [f'name: "DeepLab-{cfg.name}"', 'input: "data"',
             f"input_shape {{ dim: 1 dim: 3 dim: {height} dim: {width} }}"]

    def layer(name: str, type_: str, bottom: str, top: str, params: str = "") -> None:
        params = f" {params}" if params else ""
        lines.append(f'layer {{ name: "{name}" type: "{type_}" bottom: "{bottom}" top: "{top}"{params} }}')

    def conv(name: str, bottom: str, out: int, kernel: int, pad: int = 0, dilation: int = 1) -> None:
        extra = (f" pad: {pad}" if pad else "") + (f" dilation: {dilation}" if dilation > 1 else "")
        params = f"convolution_param {{ num_output: {out} kernel_size: {kernel}{extra} }}"
        layer(name, "Convolution", bottom, name, params)

    bottom = "data"
    for block, widths in enumerate(VGG16_WIDTHS, start=1):
        hole = 2 if block == 5 else 1
        for i, out in enumerate(widths, start=1):
            conv(f"conv{block}_{i}", bottom, out, 3, pad=hole, dilation=hole)
            bottom = f"conv{block}_{i}"
            layer(f"relu{block}_{i}", "ReLU", bottom, bottom)
        kernel, stride, pad = cfg.pools[block - 1]
        layer(f"pool{block}", "Pooling", bottom, f"pool{block}",
              f"pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }}")
        bottom = f"pool{block}"
    if cfg.pool5a:
        layer("pool5a", "Pooling", bottom, "pool5a", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }")
        bottom = "pool5a"
    kernel, dilation, pad, channels = cfg.fc6
    conv("fc6", bottom, channels, kernel, pad=pad, dilation=dilation)
    layer("relu6", "ReLU", "fc6", "fc6")
    layer("drop6", "Dropout", "fc6", "fc6", "dropout_param { dropout_ratio: 0.5 }")
    conv("fc7", "fc6", cfg.fc7, 1)
    layer("relu7", "ReLU", "fc7", "fc7")
    layer("drop7", "Dropout", "fc7", "fc7", "dropout_param { dropout_ratio: 0.5 }")
    conv(fc8_name, "fc7", num_classes, 1)
    if interp:
        layer("fc8_interp", "Interp", fc8_name, "fc8_interp", f"interp_param {{ zoom_factor: {cfg.output_stride} }}")
    return "\n".join(lines) + "\n"
