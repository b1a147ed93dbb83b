"""Side-by-side speed of the dense-CRF backends: pydensecrf (C++, one thread) vs ours (the lattice built and the
mean field run by the compiled CPU kernels, deeplab_cli/_lattice.c and _meanfield.c), with the memory-traffic
bound of our mean-field iterations next to the figure.

    python benchmarks/crf_backends.py [--size 513x513] [--labels 21] [--rounds 9] [--threads 2] [--torch-only]

Each configuration runs in its own warm worker process (pydensecrf; ours on 1 thread, as in `batch`'s CRF
workers; ours on --threads, as `segment` runs it; with --torch-only also ours without the compiled kernels on
--threads, i.e. what the torch operations alone give (the CUDA path, run on the CPU); ours on CUDA when there
is one, synchronised, with the copies to and from the device), on scikit-image's astronaut resized to --size
with realistic synthetic probabilities (LargeFOV parameters bi 4/121/5, gauss 3/3, 10 iterations). Rounds
alternate between the workers with a pause between runs; "× pydensecrf" is the median over rounds of
pydensecrf's time over the configuration's time in the same round, which stays steady on a shared machine.
Agreement and max |ΔQ| are against pydensecrf.

The bound: one iteration of the compiled loop must at least stream, for N pixels, C labels, E = Σ(d+1)·N slice
entries, lattices of m_k vertices (M in all) with rows of S floats (C rounded up to whole vector blocks) and T
threads: the entries' index and weight once (8·E bytes; the slice and the splat that follows it share them),
the unary once (4·N·C), each blur direction's lattice rows written and read once (2·4·S·Σ(d_k+1)·m_k), the
threads' splat tables cleared and read by the first direction (2·4·S·T·M), the sliced and splatted rows once
each (2·4·S·M). Divided by the copy bandwidth measured in the same worker (torch, --threads), that is the
fastest the iterations could run if memory were the limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def photo(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut resized to width×height: (H, W, 3) uint8 RGB."""
    from PIL import Image
    from skimage import data

    return np.array(Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR))


def copy_bandwidth(threads: int, mb: int = 256) -> float:
    """Best of 5 copies of an mb MiB float32 buffer with torch on `threads` threads, in bytes/s (read + write)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mb << 18)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def iteration_bytes(image: np.ndarray, labels: int, threads: int) -> tuple[int, int, int]:
    """(bytes one iteration of the compiled loop must stream, E slice entries, M vertices) for this image."""
    import torch

    from deeplab_cli import native
    from deeplab_cli.crf import PRESETS
    from deeplab_cli.permutohedral import _features, _image_lattice

    p = PRESETS["largefov"]
    shapes = [image.shape[:2]]
    n = image.shape[0] * image.shape[1]
    lattices = [_image_lattice(_features(shapes, p.pos_xy, device=torch.device("cpu")), [n]),
                _image_lattice(_features(shapes, p.bi_xy, [torch.from_numpy(image)], p.bi_rgb), [n])]
    entries = sum(lat.vertices.numel() for lat in lattices)
    vertices = sum(lat.m for lat in lattices)
    row = 4 * native.row_stride(labels)
    blur = 2 * row * sum((lat.d + 1) * lat.m for lat in lattices)
    return 8 * entries + 4 * n * labels + blur + 2 * row * threads * vertices + 2 * row * vertices, entries, vertices


def worker(key: str, size: tuple[int, int], labels: int) -> None:
    """Serve one configuration: 'ready AGREEMENT MAX_DQ' once warm, then the seconds of one CRF per 'run'."""
    import torch

    from deeplab_cli.crf import PRESETS, dense_crf_pydensecrf
    from deeplab_cli.meanfield import dense_crf_torch
    from deeplab_cli.testing import random_smooth_probs

    from deeplab_cli import native

    backend, _, where = key.partition(":")
    if where.isdigit():
        torch.set_num_threads(int(where))
    if backend == "torch-only":
        native.library = lambda: None
    image = photo(size[1], size[0])
    probs = random_smooth_probs(*size, labels, seed=0)
    params = PRESETS["largefov"]
    if backend == "pydensecrf":
        def run() -> np.ndarray:
            return dense_crf_pydensecrf(image, probs, params)
    elif where == "cuda":
        def run() -> np.ndarray:
            q = dense_crf_torch(image, probs, device="cuda", **params.as_dict()).cpu()
            torch.cuda.synchronize()
            return q.numpy()
    else:
        def run() -> np.ndarray:
            return dense_crf_torch(image, probs, device="cpu", **params.as_dict()).numpy()
    q = run()
    run()
    ref = dense_crf_pydensecrf(image, probs, params)
    print(f"ready {(q.argmax(0) == ref.argmax(0)).mean():.6f} {np.abs(q - ref).max():.2e}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            return
        t = time.perf_counter()
        run()
        print(f"{time.perf_counter() - t:.6f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="513x513", help="HxW [513x513]")
    ap.add_argument("--labels", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads besides 1 [torch's default]")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between runs")
    ap.add_argument("--torch-only", action="store_true", help="also ours without the compiled kernels (torch ops)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.worker:
        return worker(args.worker, size, args.labels)
    import torch

    threads = args.threads or torch.get_num_threads()
    keys = ["pydensecrf:1", "torch:1"] + ([f"torch:{threads}"] if threads > 1 else [])
    keys += [f"torch-only:{threads}"] if args.torch_only else []
    keys += ["torch:cuda"] if torch.cuda.is_available() else []
    workers = {}
    for key in keys:
        env = dict(os.environ, OMP_NUM_THREADS=key.rpartition(":")[2] if key[-1].isdigit() else str(threads))
        proc = subprocess.Popen([sys.executable, __file__, "--worker", key, "--size", args.size, "--labels",
                                 str(args.labels)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = proc.stdout.readline().split()
        workers[key] = (proc, ready[1], ready[2])
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {key: [] for key in keys}
    for rnd in range(args.rounds):
        for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            time.sleep(args.gap)
            proc = workers[key][0]
            proc.stdin.write("run\n")
            proc.stdin.flush()
            times[key].append(float(proc.stdout.readline()))
    for proc, _, _ in workers.values():
        proc.stdin.close()
        proc.wait()
    bandwidth = copy_bandwidth(threads)
    per_iteration, entries, vertices = iteration_bytes(photo(size[1], size[0]), args.labels, threads)
    base = np.array(times["pydensecrf:1"])
    print(f"\n{size[0]}×{size[1]}, {args.labels} labels, 10 iterations, LargeFOV (bi 4/121/5, gauss 3/3); "
          f"{args.rounds} alternating rounds, load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print(f"{'configuration':<28} {'ms/image':>9} {'min':>7} {'× pydensecrf':>13} {'labels equal':>13} {'max |ΔQ|':>9}")
    for key in keys:
        t = np.array(times[key])
        backend, _, where = key.partition(":")
        name = {"pydensecrf": "pydensecrf", "torch": "ours", "torch-only": "ours, torch ops only"}[backend]
        name += " (cuda)" if where == "cuda" else f" ({where} thread{'s' if where != '1' else ''})"
        print(f"{name:<28} {1000 * np.median(t):>9.1f} {1000 * t.min():>7.1f} {np.median(base / t):>12.2f}× "
              f"{100 * float(workers[key][1]):>12.3f}% {workers[key][2]:>9}")
    print(f"memory traffic of one compiled iteration: at least {per_iteration / 1e6:.0f} MB (E = {entries} entries, "
          f"M = {vertices} vertices); at the {bandwidth / 1e9:.1f} GB/s copy bandwidth measured on {threads} "
          f"threads: {1000 * per_iteration / bandwidth:.1f} ms per iteration, "
          f"{10000 * per_iteration / bandwidth:.0f} ms for 10")


if __name__ == "__main__":
    main()
