#!/usr/bin/env bash
# The CPU sweeps behind the README's accuracy section, as two single-thread workers side by side
# (the 2-core machine's best use: one evaluation or distillation per core).
#
#   bash benchmarks/sweep_cpu.sh          # both workers; logs in runs/sweep-a.log, runs/sweep-b.log
#   bash benchmarks/sweep_cpu.sh a        # one worker
#   bash benchmarks/sweep_cpu.sh soft     # the soft-label curves (every contender, one teacher)
#   bash benchmarks/sweep_cpu.sh seeds    # IPC 1000, distillation seeds 2-5 (the headline's spread)
#
# Every accuracy.py call reuses the records already in results/*.json (same config identity,
# evaluation epochs and repeats), so a sweep that was killed, or moved to a machine without
# runs/, resumes by running this script again: only what is missing runs; a run that both
# workers reach is made once (the second waits for it). The workers split the test curve by
# distillation seed, the headline first (IPC 1000 and 500: random, idc-f1, dasm, the window
# coreset), then IPC 200-100 and 50 (and 10, seed 0), then idc and equal compute (idc-compute)
# at IPC 100-200, then IPC 500-1000, and idc at factor 2 there last (40,000 decoded images to
# train on at 1000: about 1 h per seed here). Then the held-out trials whose rules were written
# first:
# results/ablation-phi-200.json (where PHI_LARGE belongs: IPC 200; done, its calls reuse the
# records) and results/ablation-highipc-fill-2.json (dasm-fill with a second distillation seed;
# done: not adopted) and results/ablation-phi-crossover.json (IPC 150 and 100;
# done: PHI_LARGE 0.015) and results/ablation-phi-50.json (IPC 50, phi 0.01);
# worker a ends with the held-out remainder, worker b with the 50-epoch full-data line. Commit
# results/ (after `accuracy.py --report`, which also rewrites the README's tables) as records
# land.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p runs

HEADLINE="random idc-f1 dasm window-easy15 window-easy30"  # the high-IPC headline (two coresets)

acc() { "$PY" benchmarks/accuracy.py --profile configs/profiles/cpu.yaml --set runtime.threads=1 "$@"; }
held() { acc --holdout --tag highipc --repeats 2 --no-full-data "$@"; }  # pass --seeds

curve() {  # the test curve of one distillation seed, cheapest decisive records first
  acc --no-full-data --seeds "$1" --ipc 1000 500 --methods $HEADLINE
  acc --no-full-data --seeds "$1" --ipc 200 100 --methods $HEADLINE
  acc --no-full-data --seeds "$1" --ipc 50 $([ "$1" = 0 ] && echo 10)  # IPC 10: seed 0 only
  acc --no-full-data --seeds "$1" --ipc 100 200 --methods idc-compute idc
  acc --no-full-data --seeds "$1" --ipc 1000 500 --methods idc-compute
  acc --no-full-data --seeds "$1" --ipc 500 1000 --methods idc
}

worker_a() {
  curve 0
  held --seeds 0 --ipc 200 --methods dasm-lack random idc-f1
  held --seeds 1 --ipc 1000 500 --methods dasm-fill
  held --seeds 0 --ipc 150 100 --methods dasm-lack dasm-f2  # results/ablation-phi-crossover.json
  held --seeds 0 --ipc 150 --methods idc-f1 random
  held --seeds 0 --ipc 50 --methods dasm-lack dasm-f2 idc  # results/ablation-phi-50.json
  held --seeds 0 --ipc 500 1000 --methods idc
  held --seeds 0 --ipc 1000 --methods dasm-split dasm-mixed
}

worker_b() {
  curve 1
  held --seeds 0 --ipc 200 --methods dasm idc
  held --seeds 1 --ipc 1000 500 --methods dasm-lack
  acc --ipc 10 --methods random  # the 50-epoch full-data line (the IPC 10 record is reused)
}

# soft labels (issue 29): every contender under one teacher, temperature and augmentation,
# stored (the teacher's logits in the set) then teacher (every batch relabelled); the first call
# trains the teacher, the full-data network, or waits for the other worker's
soft() { for regime in stored teacher; do for ipc in 1000 500 100; do
           acc --labels "$regime" --methods random dasm idc-f1 idc --seeds "$1" --ipc "$ipc"
         done; done; }

# more seeds where the margin is as small as the seed-to-seed spread
# (results/curve-ipc1000-seeds.json; verdict: python benchmarks/seed_pairs.py --ipc 1000 ...)
more_seeds() { for s in "$@"; do
                 acc --no-full-data --seeds "$s" --ipc 1000 --methods $HEADLINE
               done; }

case "${1:-both}" in
  seeds)
    more_seeds 2 4 > runs/seeds-a.log 2>&1 &
    more_seeds 3 5 > runs/seeds-b.log 2>&1 &
    wait ;;
  soft)
    soft 0 > runs/soft-a.log 2>&1 &
    soft 1 > runs/soft-b.log 2>&1 &
    wait ;;
  a) worker_a ;;
  b) worker_b ;;
  both)
    worker_a > runs/sweep-a.log 2>&1 &
    worker_b > runs/sweep-b.log 2>&1 &
    wait ;;
  *) echo "usage: $0 [a|b|soft|seeds]" >&2; exit 2 ;;
esac
