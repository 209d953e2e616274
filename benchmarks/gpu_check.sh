#!/usr/bin/env bash
# Every GPU check in one call (docs/protocol.md), sized for the machine it will first run on: one
# NVIDIA H200 (141 GB), Python 3.12, torch 2.11, Triton 3.6, nvcc 13.0, 16 cores, no network.
# Stage time-outs add up to 7.5 minutes (the call's limit is 8); each stage's output survives a
# later stage's failure, and the bench writes its JSON after each of its parts:
#   1. build     the extension with CUDA for the H200 (TORCH_CUDA_ARCH_LIST=9.0)        110 s
#   2. tests     the Triton kernel, extension and bounds tests on the device                  90 s
#      cuda-tests  every test marked `cuda` (among them: a matching step under
#                torch.cuda.set_sync_debug_mode('error'), auto's backends, both batchings;
#                a segment captured as a CUDA graph against the eager one)                   80 s
#   3. bench     benchmarks/kernels.py: eager / torch.compile / triton per op (fraction of the
#                copy bandwidth), the fused block with its double backward, accumulate, and
#                the matching step of the last segment (ms per class-step, max memory) at
#                IPC 50 (reference, triton, auto x vmap and sequential, auto as a CUDA
#                graph) and IPC 1000 (reference, auto); writes kernels-gpu.json and
#                auto-table.json                                                          150 s
#   4. memcheck  compute-sanitizer's memcheck over the extension's tests, where it runs       20 s
#                (it runs on some of these machines and not on others: skipped, not failed)
# Logs and JSON go to $OUT (default results/gpu); a short table is printed last. Afterwards,
# here: python benchmarks/kernels.py --table-from $OUT/kernels-gpu.json (auto's new table).
#   --dry-run    resolve every stage's command and files without a GPU (what CI can check)
# Data: copy Fashion-MNIST's four .gz files into .gpu_data/FashionMNIST/raw/ (git-ignored) and
# name .gpu_data in the device call's carry:
#   mkdir -p .gpu_data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz $_
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export DASM_DATA_ROOT=${DASM_DATA_ROOT:-.gpu_data} DASM_TEST_CUDA=1
PY=${PYTHON:-python3}
KERNEL_TESTS="tests/test_kernels.py tests/test_ext.py"
status=0
declare -a TABLE

stage() {  # stage NAME TIMEOUT LOG COMMAND...: run (or, dry, resolve) one stage
  local name=$1 limit=$2 log=$3; shift 3
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  if [ $DRY = 1 ]; then
    for word in "$@"; do  # every file a stage names must exist in this checkout
      case $word in *.py|*.sh|tests/*) [ -e "$word" ] || { echo "missing: $word"; status=1; } ;; esac
    done
    command -v "$1" > /dev/null || { echo "not found: $1"; status=1; }
    TABLE+=("$name: resolved")
    return 0
  fi
  if timeout "$limit" "$@" > "$OUT/$log" 2>&1; then
    TABLE+=("$name: ok in $(( $(date +%s) - t0 )) s")
  else
    local rc=$?
    TABLE+=("$name: FAILED (exit $rc, $(( $(date +%s) - t0 )) s; see $log)")
    status=1
  fi
  tail -5 "$OUT/$log"
}

if [ $DRY = 0 ]; then
  nvidia-smi -L | tee "$OUT/device.txt"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
fi

stage build 110 build.log env DASM_FORCE_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps -e .
stage tests 90 tests.log $PY -m pytest -q $KERNEL_TESTS tests/test_bounds.py
stage cuda-tests 80 tests-cuda.log $PY -m pytest -q -m cuda tests
stage bench 150 kernels.log $PY benchmarks/kernels.py --out "$OUT/kernels-gpu.json"
if command -v compute-sanitizer > /dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  stage memcheck 20 memcheck.log "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_ext.py
else
  TABLE+=("memcheck: skipped (compute-sanitizer not found)")
fi

echo "== summary"
printf '%s\n' "${TABLE[@]}"
if [ $DRY = 0 ] && [ -f "$OUT/kernels-gpu.json" ]; then
  $PY - "$OUT/kernels-gpu.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"copy bandwidth {d['copy_bandwidth_GBps']} GB/s; auto step {d.get('auto_step')}: "
      f"{d['matching_step_speedup']}x the reference, {d.get('class_step_ms_ipc50')} ms per "
      f"class-step at IPC 50 (target <= 3 ms, >= 3x), memory IPC 1000 / IPC 50 "
      f"{d.get('memory_ipc1000_over_ipc50')}x (target <= 1.3x)")
best = {}
for r in d["rows"]:
    if "ms" in r:
        best.setdefault((r["op"], r["pass"]), {})[r["variant"]] = r
    if r["pass"] == "step" or "error" in r:
        print(f"{r['op']:55s} {r['variant']:20s} " + "  ".join(
            f"{k} {r[k]}" for k in ("ms", "class-step ms", "max MB", "error") if k in r))
for (op, ps), v in best.items():
    if ps == "step":
        continue
    fast = min(v, key=lambda k: v[k]["ms"])
    s = "  ".join(f"{k} {v[k]['ms']:.4f}" for k in ("eager", "compile", "triton", "ext") if k in v)
    print(f"{op:55s} {ps:12s} fastest {fast:8s} {s}")
PY
fi
exit $status
