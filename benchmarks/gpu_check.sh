#!/usr/bin/env bash
# The GPU check, in one go on a machine with a CUDA GPU (budget: under 8 minutes): the CUDA-marked tests, AMP
# inference (fp16/bf16 autocast against fp32: speed and agreement), and the throughput benchmarks (restore vs guard
# forward on the GPU, Ray Data sanitize vs the in-process loop). Prints the figures and writes each step's output to
# $OUT (default runs/gpu_check). Without CUDA it says so and exits 3 (nothing was checked).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after scripts/setup.sh
#   IMAGES=8000 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu_check}
IMAGES=${IMAGES:-20000}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing checked" >&2
  exit 3
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()
t_start=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, remember failures
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "--- $name FAILED (exit $rc)"; failed+=("$name"); }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
"$PY" -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)"

# 1. CUDA-marked tests: sanitize on a GPU actor, Ray Train over NCCL
step cuda_tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

# 2. AMP inference: the shipped restorer under autocast vs fp32, same images
step amp 60 "$PY" - <<'PYEOF'
import time

import torch

from benchmarks.bench_restore import images
from trn.restorer import Restorer

r = Restorer.pretrained("fashion-mnist", device="cuda").eval()
x, source = images(r.image_shape, 8192)
x = x.cuda()


def run(dtype):
    def f(b):
        if dtype is None:
            return r.restore(b, batch_size=len(b))
        with torch.autocast("cuda", dtype=dtype):
            return r.restore(b, batch_size=len(b)).float()
    f(x[:1024])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = torch.cat([f(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    torch.cuda.synchronize()
    return out, len(x) / (time.perf_counter() - t0)


ref, rate32 = run(None)
with torch.no_grad():
    p32 = r.guard(ref).argmax(1)
print(f"AMP inference, {len(x)} images ({source}), batch 1024, {torch.cuda.get_device_name()}")
print("| precision | images/s | max abs diff vs fp32 | guard agreement vs fp32 |")
print("|---|---:|---:|---:|")
print(f"| fp32 | {rate32:,.0f} | 0 | 100.00% |")
for name, dt in (("fp16 autocast", torch.float16), ("bf16 autocast", torch.bfloat16)):
    out, rate = run(dt)
    with torch.no_grad():
        agree = (r.guard(out).argmax(1) == p32).float().mean().item()
    print(f"| {name} | {rate:,.0f} | {(out - ref).abs().max().item():.4f} | {agree:.2%} |")
PYEOF

# 3. Restore vs guard forward throughput on the GPU
step bench_restore 90 "$PY" benchmarks/bench_restore.py --device cuda --images "$IMAGES" --batch-size 1024 --repeats 3

# 4. Ray Data sanitize (GPU actors) vs the in-process loop on the GPU
step bench_sanitize 200 "$PY" benchmarks/bench_sanitize.py --device cuda --images "$IMAGES" --batch-size 1024 --workers 2

echo
echo "=== summary ($(( $(date +%s) - t_start )) s)"
grep -h "passed\|failed" "$OUT/cuda_tests.log" | tail -1
grep -h "^| fp\|^| bf" "$OUT/amp.log"
grep -h "images/s\|^| guard\|^| restore\|throughput ratio" "$OUT/bench_restore.log" | grep -v "^| pass"
grep -h "^| in-process\|^| Ray Data\|ratio (end to end)\|fixed cost\|driver received" "$OUT/bench_sanitize.log"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
