"""The held-out size grid's verdict (results/plan-size-grid.json, its rule written first; its
second seed: results/plan-size-grid-seed1.json): per cell (training images per class x IPC),
the auto plan (``dasm``) against the better of idc and idc-f1 and against random, each seed's
dasm against the same seed's baselines, and whether the cell passes (d >= -0.3 and r > 0, on
the mean over the seeds that have every method).

    python benchmarks/grid_report.py   # prints both tables, writes "outcome" into each rule file
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dasm import io  # noqa: E402
from dasm.plan import auto_plan, segment_sizes  # noqa: E402

from _common import RESULTS, commit, table  # noqa: E402

# results file tag suffix -> training images per class (digits: 8 px, about 94 per class)
CELLS = {"300": 300, "1000": 1000, "5000": 5000, "-digits": 94, "-mnist5k": 300}
SMALL_IMAGES = {"-digits"}  # factor 1 by image size (dasm.rules)
PASS_D, PASS_R = -0.3, 0.0


def by_seed(records, method, ipc, seeds) -> dict[int, float]:
    """{seed: accuracy in points (mean of its evaluations)} of ``method`` at ``ipc``."""
    return {r["seed"]: r["mean"] * 100 for r in records
            if r["method"] == method and r["ipc"] == ipc and r["seed"] in seeds}


def plan_of(ipc: int, per_class: int, small_images: bool) -> str:
    """What the auto plan of this checkout picks for the cell: factor, pools, window."""
    p = auto_plan(ipc, len(segment_sizes(ipc, "auto")), per_class)
    factor = "f1 (8 px)" if small_images else f"f{p['synthetic.factor']}"
    pools = "lack" if p["dasm.pool"] == "lack" else "full"
    window = f", window {p['dasm.window_easy']:g}" if p["dasm.window_easy"] else ""
    return f"{factor}, {pools}{window}"


def cells(seeds: tuple[int, ...]) -> list[dict]:
    """One row per cell: each method's mean over ``seeds``, and d, r and the verdict on the
    seeds that have all of dasm, random and an idc (each seed paired with itself)."""
    rows = []
    for tag, n in CELLS.items():  # "-digits": 8 px, factor 1 by image size
        path = RESULTS / f"accuracy-cpu-holdout-grid{tag}.json"
        if not path.exists():
            continue
        records = json.loads(path.read_text())["runs"]
        for ipc in sorted({r["ipc"] for r in records if r["ipc"]}):
            got = {m: by_seed(records, m, ipc, seeds) for m in ("random", "idc", "idc-f1", "dasm")}
            row = {"set": tag.strip("-") if not tag[0].isdigit() else "fashion-mnist",
                   "per class": f"~{n}" if tag in SMALL_IMAGES else n, "IPC": ipc,
                   **{m: f"{statistics.fmean(v.values()):.2f}" if v else "" for m, v in got.items()}}
            row["plan"] = plan_of(ipc, n, tag in SMALL_IMAGES)
            ds, rs = [], []
            for s in seeds:
                idcs = [got[m][s] for m in ("idc", "idc-f1") if s in got[m]]
                if s in got["dasm"] and s in got["random"] and idcs:
                    ds.append(got["dasm"][s] - max(idcs))
                    rs.append(got["dasm"][s] - got["random"][s])
            if ds:
                d, r = statistics.fmean(ds), statistics.fmean(rs)
                row.update({"seeds": len(ds), "d": f"{d:+.2f}", "r": f"{r:+.2f}",
                            "d, r by seed": "; ".join(f"{a:+.2f}, {b:+.2f}"
                                                      for a, b in zip(ds, rs)),
                            "pass": "yes" if d >= PASS_D and r > PASS_R else "NO"})
            rows.append(row)
    return rows


OUTCOMES = {"plan-size-grid.json": (0,), "plan-size-grid-seed1.json": (0, 1)}  # rule: seeds


def main():
    cols = ["set", "per class", "IPC", "plan", "random", "idc", "idc-f1", "dasm", "seeds", "d",
            "r", "d, r by seed", "pass"]
    for name, seeds in OUTCOMES.items():
        path = RESULTS / name
        if not path.exists():
            continue
        rows = cells(seeds)
        print(f"{name}: seeds {', '.join(map(str, seeds))}\n{table(rows, cols)}\n")
        data = json.loads(path.read_text())
        data["outcome"] = {"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "python benchmarks/grid_report.py", "commit": commit(),
                           "cells": rows}
        io.write_json(path, data)
    print("d = dasm - max(idc, idc-f1); r = dasm - random (points, held-out, each seed's mean of "
          "2 evaluations, paired within the seed, then averaged over the seeds that have every "
          "method); a cell passes when d >= -0.3 and r > 0; plan: what the auto plan of this "
          "checkout picks there.")


if __name__ == "__main__":
    main()
