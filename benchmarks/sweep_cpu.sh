#!/usr/bin/env bash
# The CPU sweeps behind the README's accuracy section, as two single-thread workers side by side
# (the 2-core machine's best use: one evaluation or distillation per core).
#
#   bash benchmarks/sweep_cpu.sh          # both workers; logs in runs/sweep-a.log, runs/sweep-b.log
#   bash benchmarks/sweep_cpu.sh a        # one worker
#
# Every accuracy.py call reuses the records already in results/*.json (same config identity,
# evaluation epochs and repeats), so a sweep that was killed, or moved to a machine without
# runs/, resumes by running this script again: only what is missing runs. Worker a finishes the
# held-out ablation first (it decides the large-IPC plan, dasm/plan.py), then runs dasm on the
# test split at IPC 500 and 1000; worker b runs the test curve's small IPCs and baselines, then
# the full-data line. Commit results/ as records land.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p runs

acc() { "$PY" benchmarks/accuracy.py --profile configs/profiles/cpu.yaml --set runtime.threads=1 "$@"; }
held() { acc --holdout --tag highipc --seeds 0 --repeats 2 --no-full-data "$@"; }

worker_a() {
  held --ipc 1000 --methods dasm-lack dasm-cond
  held --ipc 500 --methods dasm-cond
  held --ipc 500 --methods dasm-split dasm-mixed
  held --ipc 1000 --methods dasm-split dasm-mixed
  acc --no-full-data --ipc 1000 500 --methods dasm
  held --ipc 500 --methods idc
  held --ipc 1000 --methods idc
}

worker_b() {
  acc --no-full-data --ipc 10 50 100 200
  acc --no-full-data --ipc 500 1000 --methods random idc-f1 idc-compute idc
  acc --ipc 10 --methods random  # the 50-epoch full-data line (the rest is reused)
}

case "${1:-both}" in
  a) worker_a ;;
  b) worker_b ;;
  both)
    worker_a > runs/sweep-a.log 2>&1 &
    worker_b > runs/sweep-b.log 2>&1 &
    wait ;;
  *) echo "usage: $0 [a|b]" >&2; exit 2 ;;
esac
