#!/usr/bin/env bash
# The CUDA path in one command, in under 8 minutes on a GPU machine: the CUDA-marked tests (every command on
# cuda, fp16/bf16 against fp32, the torch CRF on the GPU against pydensecrf, pinned transfers, out-of-memory
# handling), then `deeplab benchmark --fps --compare --json` at 513×513 with batch sizes 1 and 8, and a summary
# (GPU model, network fps per precision, CRF on CUDA vs pydensecrf, end-to-end fps).
#
#   benchmarks/device_check.sh            # results in $OUT (default: a new temporary folder, printed at the end)
#   OUT=/tmp/gpu benchmarks/device_check.sh
#   benchmarks/device_check.sh --quick    # 65×65, one run: what CI runs (tests/test_device_check.py)
#
# Writes $OUT/device_check.log (everything printed) and $OUT/benchmark_<device>_bs<N>.json. On a machine without
# CUDA it still runs: the CUDA tests skip and the benchmarks run on the CPU with fewer runs.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/deeplab-device-check.XXXXXX")}
mkdir -p "$OUT"
PY=${PYTHON:-python}
log="$OUT/device_check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
run() { "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

device=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
say "== device_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $device (quick=$quick), results in $OUT"
if [[ $device == cuda ]] && command -v nvidia-smi >/dev/null; then
  run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
run $PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine())"

say "== CUDA-marked tests"
run $PY -m pytest -q -m cuda -p no:cacheprovider -rs tests

size=513 iters=5 warmup=1
if [[ $quick == 1 ]]; then
  size=65 iters=1 warmup=0
elif [[ $device == cpu ]]; then
  iters=2
fi
for bs in 1 8; do
  json="$OUT/benchmark_${device}_bs${bs}.json"
  say "== deeplab benchmark --fps --compare --size $size --batch-size $bs --device $device --iters $iters"
  $PY -m deeplab_cli.cli benchmark --fps --compare --json --size "$size" --batch-size "$bs" --device "$device" \
    --iters "$iters" --warmup "$warmup" > "$json" 2> >(tee -a "$log" >&2)
done

say "== summary"
run $PY - "$OUT"/benchmark_"$device"_bs*.json <<'EOF'
import json, sys

for path in sys.argv[1:]:
    r = json.load(open(path))
    env, fps = r["environment"], r["fps"]
    print(f"{env['device_name']} ({env['device']}), batch {env['batch_size']}, {env['image_size'][0]}×{env['image_size'][1]}, "
          f"{env['precision']}: network {fps['network']:.2f} fps, end to end {fps['end_to_end']:.2f} fps with the "
          f"{env['crf_backend']} CRF, {fps['end_to_end_without_crf']:.2f} without")
    for v in r.get("variants", []):
        name = v["precision"] + (" packed" if v.get("packed") else " + channels_last" if v["channels_last"] else "")
        print(f"  network {name:22s} {v['network']['median_ms']:8.1f} ms/image {v['fps']:8.2f} fps  "
              f"agreement with fp32 {100 * v['agreement']:.2f} %")
    for b in r.get("crf_compare", {}).get("backends", []):
        print(f"  CRF {b['backend']:10s} on {b['device']:5s} {b['crf']['median_ms']:8.1f} ms  "
              f"{b['speedup']:.2f}× {r['crf_compare']['reference']}, labels {100 * b['agreement']:.2f} % equal")
EOF
say "== done: $OUT"
