"""Side-by-side speed of the two dense-CRF backends: pydensecrf (C++, one thread) vs our PyTorch lattice.

ms per image (default 500×375, 21 labels, 10 iterations, LargeFOV parameters bi 4/121/5, gauss 3/3),
medians over interleaved runs on the same inputs, plus the ratio; on CUDA (when available) also the torch
backend there, synchronised, including the host→device copy of the inputs and the copy of Q back.

    python benchmarks/crf_backends.py [--size 500x375] [--labels 21] [--repeats 7] [--threads N]

torch runs with 1 thread (like pydensecrf) and with torch's default thread count (all cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from deeplab_cli.crf import PRESETS, dense_crf_pydensecrf
from deeplab_cli.permutohedral import dense_crf_torch
from deeplab_cli.testing import random_smooth_probs


def photo(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut resized to width×height: (H, W, 3) uint8 RGB."""
    from skimage import data

    return np.array(Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="500x375", help="WxH [500x375]")
    ap.add_argument("--labels", type=int, default=21)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads besides 1 [torch's default]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    image = photo(w, h)
    probs = random_smooth_probs(h, w, args.labels, seed=0)
    params = PRESETS["largefov"].with_overrides(iterations=args.iterations)
    kw = params.as_dict()

    threads = torch.get_num_threads()

    def torch_cpu(n_threads: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(n_threads)
            try:
                return dense_crf_torch(image, probs, device="cpu", **kw)
            finally:
                torch.set_num_threads(threads)

        return run

    runs: dict[str, Callable[[], object]] = {"pydensecrf (cpu, 1 thread)": lambda: dense_crf_pydensecrf(image, probs, params)}
    for n in sorted({1, threads}):
        runs[f"torch (cpu, {n} thread{'s' if n > 1 else ''})"] = torch_cpu(n)
    if torch.cuda.is_available():
        def on_cuda() -> object:
            q = dense_crf_torch(image, probs, device="cuda", **kw).cpu()
            torch.cuda.synchronize()
            return q

        runs["torch (cuda)"] = on_cuda
    ref = dense_crf_pydensecrf(image, probs, params)
    for name, fn in runs.items():  # warm-up, and a check that every backend computes the same thing
        q = np.asarray(fn() if "pydensecrf" in name else torch.as_tensor(fn()).cpu().numpy())
        print(f"{name}: argmax agreement with pydensecrf {(q.argmax(0) == ref.argmax(0)).mean():.5f}, "
              f"max |ΔQ| {np.abs(q - ref).max():.2e}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))

    base = statistics.median(times["pydensecrf (cpu, 1 thread)"])
    print(f"\n{w}×{h}, {args.labels} labels, {args.iterations} iterations, LargeFOV (bi 4/121/5, gauss 3/3), "
          f"medians of {args.repeats} interleaved runs")
    print(f"{'backend':<28} {'ms/image':>10} {'min ms':>9} {'speed-up vs pydensecrf':>24}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {1000 * med:>10.1f} {1000 * min(ts):>9.1f} {base / med:>23.2f}×")


if __name__ == "__main__":
    main()
