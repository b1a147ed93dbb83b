"""Caffe files at LargeFOV size (82 MB, seeded random weights): reading, and writing with raw vs float-typed payloads.

Seconds, medians over interleaved runs on the same weights, plus the ratio:
- read:        weightfiles.caffe.parse_caffemodel (Caffe's field types; upb hands numpy the packed floats)
- write raw:   testing.caffemodel_bytes (BlobProto.data declared `repeated bytes`, filled with ndarray.tobytes())
- write float: the same messages declared as Caffe does (`repeated float`), filled with ndarray.tolist()
Also the whole `convert_caffemodel` (read, sha256, check, write .safetensors) once.

    python benchmarks/caffe_import.py [--repeats 5] [--arch largefov|deeplab]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deeplab_cli.model import LAYER_ORDER, DeepLab
from deeplab_cli.testing import caffemodel_bytes
from deeplab_cli.weightfiles.caffe import convert_caffemodel, messages, parse_caffemodel


def random_weights(arch: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in DeepLab(arch).state_dict().items()}


def write_float_typed(sd: dict[str, torch.Tensor]) -> bytes:
    net = messages(raw=False).NetParameter(name="DeepLab")
    for name in LAYER_ORDER:
        layer = net.layer.add(name="fc8_voc12" if name == "fc8" else name, type="Convolution")
        for key in ("weight", "bias"):
            arr = sd[f"{name}.{key}"].numpy()
            blob = layer.blobs.add()
            blob.shape.dim.extend(arr.shape)
            blob.data.extend(arr.ravel().tolist())
    return net.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--arch", default="largefov", choices=["largefov", "deeplab"])
    args = ap.parse_args()
    sd = random_weights(args.arch)
    data = caffemodel_bytes(sd)
    assert write_float_typed(sd) == data  # the same bytes either way
    runs = {"read": lambda: parse_caffemodel(data), "write raw": lambda: caffemodel_bytes(sd),
            "write float": lambda: write_float_typed(sd)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.arch}: {len(data) / 1e6:.1f} MB, medians of {args.repeats}")
    print(f"read               {med['read']:7.3f} s")
    print(f"write raw          {med['write raw']:7.3f} s")
    ratio = med["write float"] / med["write raw"]
    print(f"write float        {med['write float']:7.3f} s   ({ratio:.1f}x the raw time)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m.caffemodel"
        src.write_bytes(data)
        t = time.perf_counter()
        convert_caffemodel(src, Path(tmp) / "m.safetensors")
        print(f"convert_caffemodel {time.perf_counter() - t:7.3f} s   (read, sha256, check, write .safetensors)")


if __name__ == "__main__":
    main()
