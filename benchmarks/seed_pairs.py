"""Paired differences over distillation seeds, with a 95 % interval: how far two methods are
apart at one IPC when the seed-to-seed spread is as large as the margin asked for.

    python benchmarks/seed_pairs.py --ipc 1000 --seeds 0 1 2 3 \
        --pairs dasm:best dasm:window-easy30 window-easy30:best --baselines random idc-f1 \
        --margin 0.5 --rule results/curve-ipc1000-seeds.json

Per pair ``a:b`` (``best``: the best of ``--baselines`` for that seed) it prints the per-seed
differences d_s = a - b (points, each the mean of that seed's evaluation repeats), their mean,
sample standard deviation and the interval mean +- t(0.975, n - 1) * std / sqrt(n), and a
reading: above the margin, containing it (undecided), between 0 and the margin, containing 0
(level), or below 0. With ``--rule`` the rows go into the rule file's ``outcome``, replacing
those of the same IPC and pair.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scipy import stats  # noqa: E402

from dasm import io  # noqa: E402

from _common import RESULTS, measured_on, table  # noqa: E402
from _methods import BASELINES  # noqa: E402
from _records import contents  # noqa: E402
from _report import paired  # noqa: E402


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the two-sided t interval of ``diffs`` (points); n >= 2."""
    n = len(diffs)
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def reading(lo: float, hi: float, margin: float) -> str:
    """What an interval [lo, hi] says against 0 and ``margin`` (> 0)."""
    if lo > margin:
        return f"above +{margin}"
    if hi < 0:
        return "below 0"
    if lo > 0:
        return f"above 0, under +{margin}" if hi < margin else f"above 0; +{margin} undecided"
    return "level (contains 0)" if hi < margin else f"undecided (contains 0 and +{margin})"


def rows(records, ipc, seeds, pairs, baselines, margin) -> list[dict]:
    out = []
    for a, b in pairs:
        diffs = paired(records, ipc, a, b, baselines=baselines, seeds=seeds)
        row = {"IPC": ipc, "pair": f"{a} - {b}", "n": len(diffs),
               "per seed": ", ".join(f"{d:+.2f}" for d in diffs)}
        if len(diffs) >= 2:
            mean, std, lo, hi = interval(diffs)
            row.update({"mean": f"{mean:+.2f}", "std": f"{std:.2f}",
                        "95 % interval": f"[{lo:+.2f}, {hi:+.2f}]",
                        "reading": reading(lo, hi, margin)})
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS / "accuracy-cpu.json")
    ap.add_argument("--ipc", type=int, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", help="default: every seed recorded")
    ap.add_argument("--pairs", nargs="+", default=["dasm:best"], help="a:b, b may be 'best'")
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES))
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--rule", type=Path, help="put the rows into this rule file's outcome")
    args = ap.parse_args(argv)
    pairs = []
    for p in args.pairs:
        a, sep, b = p.partition(":")
        if not (sep and a and b):
            ap.error(f"--pairs: {p!r} is not a:b")
        pairs.append((a, b))
    records = contents(args.results)[0]
    out = [r for ipc in args.ipc
           for r in rows(records, ipc, args.seeds, pairs, args.baselines, args.margin)]
    cols = ["IPC", "pair", "n", "per seed", "mean", "std", "95 % interval", "reading"]
    print(table(out, cols))
    print(f"\npoints, {args.results.name}; best = max({', '.join(args.baselines)}) per seed; "
          f"std with n - 1; interval: mean +- t(0.975, n - 1) std / sqrt(n)")
    if args.rule:
        data = json.loads(args.rule.read_text())
        data["outcome"] = outcome(data.get("outcome", {}), out, "python " + " ".join(sys.argv))
        io.write_json(args.rule, data)


def outcome(old: dict, new_rows: list[dict], command: str) -> dict:
    """A rule file's outcome with ``new_rows``: they replace the rows of the same IPC and pair,
    the others stay (one call per set of baselines), and the commands that wrote it are kept."""
    fresh = {(r["IPC"], r["pair"]) for r in new_rows}
    rows = [r for r in old.get("rows", []) if (r["IPC"], r["pair"]) not in fresh] + new_rows
    commands = [c for c in old.get("commands", []) if c != command] + [command]
    return {"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **measured_on(),
            "commands": commands, "rows": sorted(rows, key=lambda r: (-r["IPC"], r["pair"]))}


if __name__ == "__main__":
    main()
