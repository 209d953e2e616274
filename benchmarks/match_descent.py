"""Does the image step descend the loss it follows? Gradient matching moves the images down the
matching loss; this distils one set twice with the same seed, init, networks and compute, once
with the images moving (the config's image learning rate) and once frozen (a step 1e-9 of it),
and prints the matching loss each logged. Moving images should end lower; where they end higher,
the step climbs its own loss (results/digits-depth.json: a 2x2 instance-norm plane on 8x8 digits).

    python benchmarks/match_descent.py --profile configs/profiles/cpu.yaml --name digits-ipc10 \
        --set data.name=digits --set data.holdout_per_class=50 --ipc 10 --method idc-f1

Writes ``results/match-descent.json`` (one entry per ``--name``, with its command, commit and
CPU); the runs go to ``runs/match-descent/<name>-<moving|frozen>``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dasm  # noqa: E402
from dasm import io  # noqa: E402
from dasm.rundir import RunDir  # noqa: E402

from _common import ROOT, table, update_results  # noqa: E402
from _methods import METHODS, load_profile, run_config  # noqa: E402

FROZEN = 1e-9  # x the config's image learning rate: the images do not move


def matching_log(run_dir) -> list[dict]:
    """The ``match`` records of a run's metrics.jsonl: iteration, loss, image_change."""
    return [r for r in io.read_jsonl(RunDir(run_dir).metrics) if r["event"] == "match"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", required=True, help="the entry's name in the results file")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--method", default="idc-f1", choices=[m for m, v in METHODS.items() if v])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    base, _ = load_profile(args.profile, args.overrides, holdout=True)
    cfg = run_config(base, args.method, args.ipc, args.seed)
    rows, logs = [], {}
    for side, scale in (("moving", 1.0), ("frozen", FROZEN)):
        out = ROOT / "runs" / "match-descent" / f"{args.name}-{side}"
        shutil.rmtree(out, ignore_errors=True)  # a diagnosis: always made afresh
        run_cfg = cfg.replace(**{"match.lr_img_scale": cfg.match.lr_img_scale * scale})
        dasm.distill(run_cfg, out)
        logs[side] = matching_log(out)
    for a, b in zip(logs["moving"], logs["frozen"]):
        rows.append({"segment": a["segment"], "iteration": a["iteration"],
                     "loss moving": round(a["loss"], 3), "loss frozen": round(b["loss"], 3),
                     "moving - frozen": round(a["loss"] - b["loss"], 3),
                     "image change": round(a["image_change"], 5)})
    print(table(rows, list(rows[0])))
    final = max(r["iteration"] for r in rows)
    last = statistics.fmean(r["moving - frozen"] for r in rows if r["iteration"] == final)
    verdict = "descends" if last < 0 else "CLIMBS its own loss"
    print(f"\n{args.name}: at the last logged iteration, moving - frozen = {last:+.3f}: "
          f"the image step {verdict}")
    path = update_results("match-descent.json", args.name, {
        "command": "python " + " ".join(sys.argv), "method": args.method, "ipc": args.ipc,
        "seed": args.seed, "overrides": args.overrides, "rows": rows,
        "last_moving_minus_frozen": round(last, 3), "reading": verdict})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
