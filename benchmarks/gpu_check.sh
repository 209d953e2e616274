#!/usr/bin/env bash
# Every GPU check in one call (PROTOCOL.md), within about 8 minutes on one H100:
#   1. build the extension with CUDA (TORCH_CUDA_ARCH_LIST=9.0)
#   2. the CUDA tests and the Triton kernel tests on the device
#   3. the kernel and end-to-end benchmarks (benchmarks/kernels.py)
# Logs and JSON go to $OUT (default results/gpu); a short table is printed last.
# Data: copy Fashion-MNIST's four .gz files into .gpu_data/FashionMNIST/raw/ (git-ignored) and
# name .gpu_data in the device call's carry:
#   mkdir -p .gpu_data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*.gz $_
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export DASM_DATA_ROOT=${DASM_DATA_ROOT:-.gpu_data} DASM_TEST_CUDA=1
PY=${PYTHON:-python3}
status=0
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

echo "== build" && t0=$(date +%s)
if DASM_FORCE_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - t0 )) s"; $PY -c "import dasm._C as c; print('ext has_cuda', c.has_cuda())"
else
  echo "BUILD FAILED (see build.log)"; tail -20 "$OUT/build.log"; status=1
fi

echo "== tests on the device"
timeout 240 $PY -m pytest -q -x tests/test_kernels.py tests/test_ext.py 2>&1 | tee "$OUT/tests-kernels.log" | tail -5 || status=1
timeout 120 $PY -m pytest -q -m cuda tests 2>&1 | tee "$OUT/tests-cuda.log" | tail -5 || status=1

echo "== benchmarks"
timeout 240 $PY benchmarks/kernels.py --out "$OUT/kernels-gpu.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 || status=1

echo "== summary"
grep -E "passed|failed|error" "$OUT"/tests-*.log | tail -4
[ -f "$OUT/kernels-gpu.json" ] && $PY - "$OUT/kernels-gpu.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"copy bandwidth {d['copy_bandwidth_GBps']} GB/s; matching step triton/reference speed-up {d['matching_step_speedup']}x")
best = {}
for r in d["rows"]:
    if "ms" in r:
        best.setdefault((r["op"], r["pass"]), {})[r["variant"]] = r["ms"]
for (op, ps), v in best.items():
    if "triton" in v:
        s = "  ".join(f"{k}/triton {v[k] / v['triton']:.2f}x" for k in ("eager", "compile") if k in v)
        print(f"{op:55s} {ps:8s} triton {v['triton']:.4f} ms  {s}")
PY
exit $status
