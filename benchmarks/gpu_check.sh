#!/usr/bin/env bash
# Every GPU check in one call (PROTOCOL.md), within 8 minutes on one H100. Sized by timeouts
# that add up to 7.5 minutes (build 150 s on 16 cores, device tests 150 s, benchmarks 150 s);
# each stage's output survives a later stage's failure:
#   1. build the extension with CUDA (TORCH_CUDA_ARCH_LIST=9.0): C++ block + CUDA accumulate
#   2. the Triton kernel tests and every `cuda` test on the device, among them the CUDA
#      accumulate_class_grads against the reference and the Triton fused block
#   3. benchmarks/kernels.py: eager / torch.compile / triton per op (fraction of copy
#      bandwidth), the fused block with its double backward, and the matching step of the last
#      segment at IPC 50 and 1000 (class-steps/s, torch.cuda.max_memory_allocated)
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
if DASM_FORCE_CUDA=1 timeout 150 $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - t0 )) s"; $PY -c "import dasm._C as c; print('ext has_cuda', c.has_cuda())"
else
  echo "BUILD FAILED (see build.log)"; tail -20 "$OUT/build.log"; status=1
fi

echo "== tests on the device"
timeout 100 $PY -m pytest -q tests/test_kernels.py tests/test_ext.py 2>&1 | tee "$OUT/tests-kernels.log" | tail -5 || status=1
timeout 50 $PY -m pytest -q -m cuda tests 2>&1 | tee "$OUT/tests-cuda.log" | tail -5 || status=1

echo "== benchmarks"
timeout 150 $PY benchmarks/kernels.py --out "$OUT/kernels-gpu.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 || status=1

echo "== summary"
grep -E "passed|failed|error" "$OUT"/tests-*.log | tail -4
[ -f "$OUT/kernels-gpu.json" ] && $PY - "$OUT/kernels-gpu.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"copy bandwidth {d['copy_bandwidth_GBps']} GB/s; matching step speed-up over the "
      f"reference {d['matching_step_speedup']}x")
best = {}
for r in d["rows"]:
    if "ms" in r:
        best.setdefault((r["op"], r["pass"]), {})[r["variant"]] = r
    if r["pass"] == "step" or "error" in r:
        print(f"{r['op']:55s} {r['variant']:20s} " + "  ".join(
            f"{k} {r[k]}" for k in ("ms", "class-steps/s", "max MB", "error") if k in r))
for (op, ps), v in best.items():
    if "triton" in v:
        t = v["triton"]["ms"]
        s = "  ".join(f"{k}/triton {v[k]['ms'] / t:.2f}x" for k in ("eager", "compile") if k in v)
        bw = v["triton"].get("of copy bw", "")
        print(f"{op:55s} {ps:12s} triton {t:.4f} ms {bw:>5s}  {s}")
PY
exit $status
