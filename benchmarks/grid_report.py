"""The held-out size grid's verdict (results/plan-size-grid.json, its rule written first): per
cell (training images per class x IPC), the auto plan (``dasm``) against the better of idc and
idc-f1 and against random, and whether the cell passes (d >= -0.3 and r > 0).

    python benchmarks/grid_report.py            # prints the table, writes "outcome" into the file
"""
from __future__ import annotations

import json
import os
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


def mean(records, method, ipc):
    rs = [r["mean"] * 100 for r in records if r["method"] == method and r["ipc"] == ipc]
    return rs[0] if rs else None


def plan_of(ipc: int, per_class: int, small_images: bool) -> str:
    """What the auto plan of this checkout picks for the cell: factor, pools, window."""
    p = auto_plan(ipc, len(segment_sizes(ipc, "auto")), per_class)
    factor = "f1 (8 px)" if small_images else f"f{p['synthetic.factor']}"
    pools = "lack" if p["dasm.pool"] == "lack" else "full"
    window = f", window {p['dasm.window_easy']:g}" if p["dasm.window_easy"] else ""
    return f"{factor}, {pools}{window}"


def cells() -> list[dict]:
    rows = []
    for tag, n in CELLS.items():  # "-digits": 8 px, factor 1 by image size
        path = RESULTS / f"accuracy-cpu-holdout-grid{tag}.json"
        if not path.exists():
            continue
        records = json.loads(path.read_text())["runs"]
        for ipc in sorted({r["ipc"] for r in records if r["ipc"]}):
            got = {m: mean(records, m, ipc) for m in ("random", "idc", "idc-f1", "dasm")}
            row = {"set": tag.strip("-") if not tag[0].isdigit() else "fashion-mnist",
                   "per class": f"~{n}" if tag in SMALL_IMAGES else n, "IPC": ipc,
                   **{m: f"{v:.2f}" if v is not None else "" for m, v in got.items()}}
            row["plan"] = plan_of(ipc, n, tag in SMALL_IMAGES)
            idcs = [v for m, v in got.items() if m in ("idc", "idc-f1") and v is not None]
            if got["dasm"] is not None and idcs and got["random"] is not None:
                d, r = got["dasm"] - max(idcs), got["dasm"] - got["random"]
                row.update({"d": f"{d:+.2f}", "r": f"{r:+.2f}",
                            "pass": "yes" if d >= PASS_D and r > PASS_R else "NO"})
            rows.append(row)
    return rows


def main():
    rows = cells()
    cols = ["set", "per class", "IPC", "plan", "random", "idc", "idc-f1", "dasm", "d", "r", "pass"]
    print(table(rows, cols))
    print("\nd = dasm - max(idc, idc-f1); r = dasm - random (points, held-out, seed 0, mean of "
          "2 evaluations); a cell passes when d >= -0.3 and r > 0; plan: what the auto plan of "
          "this checkout picks there.")
    path = RESULTS / "plan-size-grid.json"
    data = json.loads(path.read_text())
    data["outcome"] = {"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "command": "python benchmarks/grid_report.py", "commit": commit(),
                       "cells": rows}
    io.write_json(path, data)


if __name__ == "__main__":
    main()
