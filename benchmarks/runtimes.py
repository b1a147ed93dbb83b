"""The CPU runtimes a user could run DeepLab with, side by side: ms per image, time relative to ours in the same
round ("× ours") and argmax agreement with eager PyTorch fp32 after the ×8 upsampling.

    python benchmarks/runtimes.py                        # LargeFOV, 513×513, 15 rounds, torch's thread count
    python benchmarks/runtimes.py --threads 2 --rounds 9 --only ours-fp32,onnxruntime-fp32 --json out.json
    python benchmarks/runtimes.py --compile              # also torch.compile (30+ s first call each)

One seeded random model (or --weights) is exported once to ONNX, and every runtime runs in its own warm worker
process with the same thread count on the same preprocessed input (a generated photo-like image). Rounds
alternate between the workers (one timed inference each, in a rotating order, with a pause between runs so
that no runtime's idle spinning threads overlap another's run): "× ours" is the median over rounds of a
runtime's time divided by ours (`ours-fp32`, what `deeplab segment` runs) in the same round, which stays steady
on a noisy machine. Peers that are not installed (onnxruntime, openvino, opencv, nncf) are skipped with a note.
The load average before and after is printed: on a shared machine quote the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE = "ours-fp32"


@dataclass(frozen=True)
class Runtime:
    """A way to run the network: its key (for --only), how the table names it and the module it needs."""

    key: str
    label: str
    needs: str | None = None  # an importable module, None for torch alone
    onnx: bool = False  # runs the exported ONNX file
    opt_in: bool = False  # only with --compile


RUNTIMES = [
    Runtime("ours-fp32", "ours, fp32 (the CPU default: PackedNetwork)"),
    Runtime("eager-fp32", "eager PyTorch fp32 + channels_last (the default before PackedNetwork)"),
    Runtime("onnxruntime-fp32", "ONNX Runtime fp32 (CPUExecutionProvider, all graph optimisations)", "onnxruntime", True),
    Runtime("openvino-f32", "OpenVINO, INFERENCE_PRECISION_HINT f32", "openvino", True),
    Runtime("opencv-dnn", "OpenCV DNN (ONNX import)", "cv2", True),
    Runtime("compile-fp32", "torch.compile + freezing, fp32", opt_in=True),
    Runtime("ours-bf16", "ours, --precision bf16 (PackedNetwork, bf16 weights packed once)"),
    Runtime("openvino-default", "OpenVINO default (picks bf16 by itself on bf16 CPUs)", "openvino", True),
    Runtime("compile-bf16", "torch.compile + freezing, bf16", opt_in=True),
    Runtime("openvino-int8", "OpenVINO int8 (NNCF post-training, 20 generated calibration images)", "nncf", True),
]


# ---------------------------------------------------------------------------------------------
# Worker side: build one runtime, then answer `run` (seconds of one inference) and `labels PATH` on stdin.


def _torch_model(weights: str):
    from deeplab_cli.weightfiles.formats import build_model, load_weights

    return build_model(load_weights(weights))


def _build(key: str, weights: str, onnx_path: str, x: np.ndarray, threads: int) -> Callable[[], np.ndarray]:
    """The runtime `key` ready to run → a call returning fc8 scores (1, C, h, w) float32 for the input x."""
    import torch

    torch.set_num_threads(threads)
    if key in ("ours-fp32", "ours-bf16", "eager-fp32"):
        from deeplab_cli.pipeline import Segmenter

        seg = Segmenter(_torch_model(weights), device="cpu", precision="bf16" if key == "ours-bf16" else "fp32",
                        crf=None, packed=key != "eager-fp32")
        xt = torch.from_numpy(x)
        return lambda: seg.scores(xt).float().numpy()
    if key.startswith("compile"):
        import torch._inductor.config as inductor

        inductor.freezing = True
        dtype = torch.bfloat16 if key == "compile-bf16" else torch.float32
        model = _torch_model(weights).to(dtype=dtype, memory_format=torch.channels_last)
        compiled = torch.compile(model)
        xt = torch.from_numpy(x).to(dtype).contiguous(memory_format=torch.channels_last)

        def run() -> np.ndarray:
            with torch.inference_mode():
                return compiled(xt).float().numpy()
        return run
    if key == "onnxruntime-fp32":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"data": x})[0]
    if key.startswith("openvino"):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(onnx_path)
        config = {"INFERENCE_NUM_THREADS": threads}
        if key == "openvino-f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if key == "openvino-int8":
            import nncf

            rng = np.random.default_rng(1)
            calibration = [(x + rng.normal(0, 20, x.shape)).astype(np.float32) for _ in range(20)]
            model = nncf.quantize(model, nncf.Dataset(calibration))
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        return lambda: next(iter(request.infer({0: x}).values()))
    if key == "opencv-dnn":
        import cv2

        cv2.setNumThreads(threads)
        net = cv2.dnn.readNetFromONNX(onnx_path)

        def run() -> np.ndarray:
            net.setInput(x)
            return net.forward()
        return run
    raise ValueError(f"unknown runtime {key}")


def _labels(scores: np.ndarray, arch: str, height: int, width: int) -> np.ndarray:
    """fc8 scores (1, C, h, w) → argmax labels (H, W) after Caffe's ×8 upsampling, cropped to the image."""
    import torch

    from deeplab_cli.transforms import upsample_scores

    up = upsample_scores(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), arch)
    return up[0, :, :height, :width].argmax(0).numpy().astype(np.uint8)


def worker(args: argparse.Namespace) -> None:
    """Serve one runtime: `ready FIRST_CALL_S` once built and warmed up, then one reply per command."""
    x = np.load(args.input)
    start = time.perf_counter()
    run = _build(args.worker, args.weights, args.onnx, x, args.threads)
    scores = run()
    first = time.perf_counter() - start
    run()
    print(f"ready {first:.3f}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            t = time.perf_counter()
            scores = run()
            print(f"{time.perf_counter() - t:.6f}", flush=True)
        elif command == "labels":
            np.save(arg, _labels(scores, args.arch, args.height, args.width))
            print("saved", flush=True)
        else:
            return


# ---------------------------------------------------------------------------------------------
# Parent side


class Worker:
    """A runtime's warm worker process."""

    def __init__(self, runtime: Runtime, args: argparse.Namespace, files: dict[str, str], arch: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.runtime = runtime
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", runtime.key, "--weights", files["weights"], "--onnx", files["onnx"],
             "--input", files["input"], "--threads", str(args.threads), "--arch", arch,
             "--height", str(args.size[0]), "--width", str(args.size[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] != "ready":
            self.proc.kill()
            raise RuntimeError(f"{runtime.key} did not start (its error is above)")
        self.first_call = float(reply[1])

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _available(runtime: Runtime, args: argparse.Namespace) -> str | None:
    """None when the runtime can run here, else why not."""
    import importlib.util

    from deeplab_cli.cpu import cpu_has_bf16

    if runtime.opt_in and not args.compile:
        return "needs --compile (its first call costs 30+ s)"
    for module in filter(None, [runtime.needs, "openvino" if runtime.key == "openvino-int8" else None]):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {module})"
    if runtime.key.endswith("bf16") and not cpu_has_bf16():
        return "this CPU has no bf16 instructions"
    return None


def prepare(args: argparse.Namespace, folder: Path, need_onnx: bool) -> tuple[dict[str, str], np.ndarray, str]:
    """Write the weights, the input and (if needed) the ONNX file → (paths, reference labels, architecture)."""
    import torch

    from deeplab_cli.benchmark import synthetic_image
    from deeplab_cli.pipeline import Segmenter
    from deeplab_cli.testing import random_model
    from deeplab_cli.weightfiles.formats import build_model, load_weights, save_weights

    model = build_model(load_weights(args.weights)) if args.weights else random_model("largefov", seed=args.seed)
    arch = model.arch.name
    files = {"weights": str(folder / "model.safetensors"), "input": str(folder / "x.npy"),
             "onnx": str(folder / "model.onnx")}
    save_weights(model.state_dict(), files["weights"], arch, {"source": "benchmarks/runtimes.py"})
    seg = Segmenter(model, device="cpu", crf=None, packed=False, channels_last=False)
    image = synthetic_image(*args.size, np.random.default_rng(args.seed))
    x = seg.prepare([image], seg.input_size(*args.size))
    np.save(files["input"], x.numpy())
    with torch.inference_mode():
        reference = _labels(model(x).numpy(), arch, *args.size)
    if need_onnx:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), files["onnx"], input_names=["data"], output_names=["scores"],
                              opset_version=17, dynamo=False)
    return files, reference, arch


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "onnxruntime", "openvino", "opencv-python-headless", "nncf"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="513", help="HxW or one number [513]")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime [torch's default]")
    ap.add_argument("--only", default=None, help="comma-separated runtime keys: " + ", ".join(r.key for r in RUNTIMES))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow first call)")
    ap.add_argument("--weights", default=None, help="a weights file instead of seeded random LargeFOV weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between runs (idle threads stop spinning)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    for hidden in ("--worker", "--onnx", "--input", "--arch"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    parts = [int(p) for p in args.size.lower().replace("×", "x").split("x")]
    args.size = (parts[0], parts[-1])
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    wanted = set(args.only.split(",")) if args.only else None
    if wanted and wanted - {r.key for r in RUNTIMES}:
        ap.error(f"unknown runtimes: {', '.join(sorted(wanted - {r.key for r in RUNTIMES}))}")
    chosen = [r for r in RUNTIMES if wanted is None or r.key in wanted or r.key == REFERENCE]  # ratios need ours
    skipped = {r.key: why for r in chosen if (why := _available(r, args))}
    chosen = [r for r in chosen if r.key not in skipped]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="deeplab-runtimes-") as tmp:
        files, reference, arch = prepare(args, Path(tmp), any(r.onnx for r in chosen))
        workers = []
        for r in chosen:
            print(f"starting {r.key} ...", file=sys.stderr, flush=True)
            try:
                workers.append(Worker(r, args, files, arch))
            except RuntimeError as exc:
                skipped[r.key] = str(exc)
        times: dict[str, list[float]] = {w.runtime.key: [] for w in workers}
        for rnd in range(args.rounds):
            shift = rnd % len(workers)
            for w in workers[shift:] + workers[:shift]:
                time.sleep(args.gap)
                times[w.runtime.key].append(float(w.ask("run")))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {1000 * v[-1]:.0f}" for k, v in times.items()),
                  file=sys.stderr, flush=True)
        agreement = {}
        for w in workers:
            path = Path(tmp) / f"{w.runtime.key}.npy"
            w.ask(f"labels {path}")
            agreement[w.runtime.key] = float((np.load(path) == reference).mean())
            w.close()
    ours = np.array(times[REFERENCE])
    rows = [{
        "runtime": w.runtime.key, "label": w.runtime.label,
        "median_ms": round(1000 * statistics.median(times[w.runtime.key]), 1),
        "min_ms": round(1000 * min(times[w.runtime.key]), 1),
        "x_ours": round(float(np.median(np.array(times[w.runtime.key]) / ours)), 3),
        "agreement": round(agreement[w.runtime.key], 6), "first_call_s": round(w.first_call, 2),
    } for w in workers]
    from deeplab_cli.cpu import cpu_name

    report = {"cpu": cpu_name(), "threads": args.threads, "size": list(args.size), "arch": arch,
              "weights": args.weights or f"random (seed {args.seed})", "rounds": args.rounds,
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "versions": versions(),
              "runtimes": rows, "skipped": skipped}
    print(f"\n{report['cpu']}, {args.threads} threads, {arch} {args.size[0]}×{args.size[1]}, {report['weights']}, "
          f"{args.rounds} alternating rounds; load average {report['load_average_before'][0]} before, "
          f"{report['load_average_after'][0]} after")
    print("| runtime | ms/image (median) | min | × ours | agreement | first call s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['median_ms']:.0f} | {row['min_ms']:.0f} | {row['x_ours']:.2f} | "
              f"{100 * row['agreement']:.2f} % | {row['first_call_s']:.1f} |")
    for key, why in skipped.items():
        print(f"skipped {key}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
