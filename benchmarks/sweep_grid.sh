#!/usr/bin/env bash
# The held-out size grid of results/plan-size-grid.json (its rule was written before any run):
# Fashion-MNIST subsampled to N training images per class (data.train_per_class) x IPC 10 and
# 50, random / idc / idc-f1 / dasm, plus digits and MNIST at 300/50. Two single-thread workers
# side by side; every call reuses the records already in results/ (same identity, same code),
# so rerunning resumes.
#
#   bash benchmarks/sweep_grid.sh baselines   # random, idc, idc-f1 (they do not read the plan)
#   bash benchmarks/sweep_grid.sh dasm        # the auto plan in every cell
#   bash benchmarks/sweep_grid.sh report      # tables of every cell
#   SEED=1 bash benchmarks/sweep_grid.sh all  # every cell, all four methods, another seed
#                                             # (results/plan-size-grid-seed1.json)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1
mkdir -p runs

cell() {  # N (train images per class, "digits" or "mnist5k"), then accuracy.py arguments
  local n=$1; shift
  local data
  case $n in
    digits) data=(--set data.name=digits --set data.holdout_per_class=50 --tag grid-digits) ;;
    mnist5k) data=(--set data.name=mnist5k --set data.holdout_per_class=100 --tag grid-mnist5k) ;;
    *) data=(--set data.train_per_class="$n" --tag "grid$n") ;;
  esac  # mnist5k: the factor trial's cell (results/plan-factor-share.json)
  "$PY" benchmarks/accuracy.py --profile configs/profiles/cpu.yaml --set runtime.threads=1 \
    --holdout "${data[@]}" --seeds "$SEED" --repeats 2 --no-full-data "$@"
}

baselines_a() { for n in 300 1000 5000; do cell "$n" --ipc 10 --methods random idc idc-f1; done
                cell 300 --ipc 50 --methods random idc idc-f1; cell 5000 --ipc 50 --methods idc-f1; }
baselines_b() { cell 1000 --ipc 50 --methods random idc idc-f1; cell 5000 --ipc 50 --methods random idc
                cell digits --ipc 10 50 --methods random idc-f1; }
dasm_a() { for n in 300 1000 5000; do cell "$n" --ipc 10 --methods dasm; done; cell 300 --ipc 50 --methods dasm; }
dasm_b() { cell 1000 --ipc 50 --methods dasm; cell 5000 --ipc 50 --methods dasm; cell digits --ipc 10 50 --methods dasm; }

case "${1:-}" in
  baselines) baselines_a > runs/grid-a.log 2>&1 & baselines_b > runs/grid-b.log 2>&1 & wait ;;
  dasm) dasm_a > runs/grid-dasm-a.log 2>&1 & dasm_b > runs/grid-dasm-b.log 2>&1 & wait ;;
  all) { baselines_a; dasm_a; } > runs/grid-a.log 2>&1 &
       { baselines_b; dasm_b; cell mnist5k --ipc 50 --methods random idc idc-f1 dasm; } \
         > runs/grid-b.log 2>&1 & wait ;;
  report) for t in grid300 grid1000 grid5000 grid-digits grid-mnist5k; do "$PY" \
            benchmarks/accuracy.py --profile configs/profiles/cpu.yaml --holdout --tag "$t" \
            --report; done ;;
  *) echo "usage: [SEED=S] $0 baselines|dasm|all|report" >&2; exit 2 ;;
esac
