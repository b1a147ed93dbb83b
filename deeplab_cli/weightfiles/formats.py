"""Weight file formats: load safely, map foreign key layouts onto ours, check against the architecture, save.

Formats: `.safetensors` (what `deeplab weights convert` writes, with metadata) and PyTorch state
dicts loaded with `torch.load(weights_only=True)` (never unpickling arbitrary objects). Caffe's
`.caffemodel` is read by weightfiles/caffe.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DeeplabError, UsageError
from ..io import atomic_path
from ..model import ARCHS, DeepLab, check_shapes, infer_arch, layer_order

_PREFIXES = ("module.", "model.", "net.", "base.", "deeplab.")


@dataclass
class Weights:
    """A loaded state dict (key → CPU tensor) with its architecture, class count and file metadata."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    num_classes: int
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def crf_preset(self) -> str:
        """The CRF preset recorded with the weights (metadata `crf_preset`), else their architecture's."""
        return self.metadata.get("crf_preset") or ARCHS[self.arch].crf_preset


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 0:
        raise DeeplabError(f"{path}: empty file, not a weights file")
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith((b"PK", b"\x80"))):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            if path.suffix == ".safetensors":
                raise DeeplabError(f"{path}: not a valid safetensors file ({exc})") from None
    if path.suffix == ".caffemodel":
        raise DeeplabError(f"{path}: a Caffe model; convert it first with `deeplab weights convert {path} -o OUT.safetensors`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or malicious files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects that a weights file should not (refusing to unpickle them)"
        raise DeeplabError(f"{path}: not a weights file: {reason}") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeeplabError(f"{path}: not a state dict of tensors")
    return dict(obj), {}


def normalize_state_dict(sd: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """Map foreign key layouts (module. prefixes, fc8_voc12, pool1_ms_voc12, torchvision-style features.N) onto ours.

    Keys holding every layer of the single-scale or the multi-scale networks are taken by name (the larger
    set that fits); otherwise the 4-D weights (and their biases) are taken in file order, if there are as
    many as one of the two has layers.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        key = re.sub(r"^fc8[^.]*\.", "fc8.", key)  # fc8_voc12, fc8_pascal, ...
        key = re.sub(r"^(data|pool[1-4])_ms[^.]*\.", r"\1_ms.", key)  # pool1_ms_voc12, ...
        out[key] = value
    orders = sorted({tuple(layer_order(arch)) for arch in ARCHS}, key=len, reverse=True)
    for order in orders:
        wanted = {f"{layer}.{p}" for layer in order for p in ("weight", "bias")}
        if wanted <= out.keys():
            _refuse_unmapped(out.keys() - wanted, source)
            return {f"{layer}.{p}": out[f"{layer}.{p}"] for layer in order for p in ("weight", "bias")}
    # Same tensors under other names: take the 4-D weights (and their biases) in file order.
    pairs = []
    for key, value in out.items():
        if key.endswith("weight") and value.dim() == 4:
            bias_key = key[: -len("weight")] + "bias"
            pairs.append((key, value, out.get(bias_key)))
    order = next((o for o in orders if len(o) == len(pairs)), orders[-1])
    if len(pairs) != len(order) or any(b is None for _, _, b in pairs):
        wanted = {f"{layer}.{p}" for layer in order for p in ("weight", "bias")}
        unmapped = sorted(k for k in out if k not in wanted)[:8]
        missing = [k for layer in order for k in (f"{layer}.weight", f"{layer}.bias") if k not in out][:8]
        need = " or ".join(str(len(o)) for o in reversed(orders))
        raise DeeplabError(
            f"{source}: cannot map keys onto DeepLab layers: found {len(pairs)} convolution weights, "
            f"need {need}; missing e.g. {', '.join(missing)}; unmapped e.g. {', '.join(unmapped) or '-'}"
        )
    mapped = {}
    for layer, (_, weight, bias) in zip(order, pairs):
        mapped[f"{layer}.weight"] = weight
        mapped[f"{layer}.bias"] = bias.reshape(-1)
    used = {k for key, _, _ in pairs for k in (key, key[: -len("weight")] + "bias")}
    _refuse_unmapped(out.keys() - used, source)
    return mapped


def _refuse_unmapped(keys: set[str], source: str) -> None:
    # A tensor we would silently drop (batch-norm statistics, an extra head) means another network.
    if keys:
        shown = ", ".join(sorted(keys)[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise DeeplabError(f"{source}: keys that map onto no DeepLab layer: {shown}")


def load_weights(path: str | os.PathLike, arch: str | None = None) -> Weights:
    """Load and check a weights file; arch defaults to the file's metadata, then to fc6's shape."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file not found")
    raw, metadata = _read_raw(path)
    sd = normalize_state_dict(raw, source=str(path))
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    detected = metadata.get("arch") or infer_arch(sd)
    arch = arch or detected or "largefov"
    if arch not in ARCHS:
        raise DeeplabError(f"{path}: unknown architecture {arch!r} in metadata")
    fc8 = sd.get("fc8.weight")
    num_classes = int(fc8.shape[0]) if fc8 is not None else 21
    check_shapes(sd, arch, num_classes, source=str(path))
    return Weights(sd, arch, num_classes, metadata, path)


def save_weights(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, arch: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as .safetensors (atomically) with arch and class-count metadata."""
    from safetensors.torch import save_file

    num_classes = int(sd["fc8.weight"].shape[0])
    check_shapes(sd, arch, num_classes)
    meta = {"format": "deeplab-cli", "arch": arch, "classes": str(num_classes), **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)


def build_model(weights: Weights | None, arch: str = "largefov", num_classes: int = 21) -> DeepLab:
    """A DeepLab in eval mode holding the given weights (or random weights when weights is None)."""
    if weights is None:
        model = DeepLab(arch, num_classes)
    else:
        model = DeepLab(weights.arch, weights.num_classes)
        model.load_state_dict(weights.state_dict)
    return model.eval()
