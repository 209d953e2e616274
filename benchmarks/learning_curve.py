"""Learning curve of IDC's matching budget (docs/protocol.md, profile ``cpu``).

    python benchmarks/learning_curve.py --profile configs/profiles/cpu.yaml --ipc 50 \
        --steps 100 200 400

idc at one IPC after each number of matching steps (outer iterations x inner steps; every budget
is its own run, so a budget is exactly what a run of that length gives), evaluated on the
held-out split (``benchmark.holdout_per_class`` training images per class; the test split is not
touched). Choose B where the last doubling adds under 0.5 points, or the largest B the sweep's
time cap allows. Writes ``results/learning-curve-<profile>.{json,png}``; finished runs under
``runs/learning-curve/`` are reused.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy import distill_seconds, load_profile  # noqa: E402
from dasm import api, io  # noqa: E402
from dasm.data import dataset_from_config  # noqa: E402
from dasm.rundir import RunDir  # noqa: E402
from dasm.schedule import distill  # noqa: E402

from _common import RESULTS, ROOT, machine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=str(ROOT / "configs/profiles/cpu.yaml"))
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    base, _ = load_profile(a.profile, a.set, holdout=True)
    profile = Path(a.profile).stem
    ds = dataset_from_config(base.data)
    inner = base.match.inner_steps
    out_json = RESULTS / f"learning-curve-{profile}.json"
    records = []
    for steps in sorted(a.steps):
        if steps % inner:
            raise SystemExit(f"--steps {steps} is not a multiple of match.inner_steps={inner}")
        cfg = base.replace(**{"synthetic.ipc": a.ipc, "dasm.segments": 1,
                              "match.iterations": steps // inner})
        out = ROOT / "runs" / "learning-curve" / profile / f"idc-ipc{a.ipc}-steps{steps}"
        run = RunDir(out)
        if not run.synthetic.exists():  # finished runs are reused; a killed one resumes
            distill(cfg, out, resume=run.config.exists(), dataset=ds)
        t_make = distill_seconds(run)
        t0 = time.perf_counter()
        s = api.evaluate(out, dataset=ds, progress=False)
        rec = {"method": "idc", "ipc": a.ipc, "steps": steps, "accuracies": s["accuracies"],
               "mean": s["mean"], "std": s["std"], "distill_seconds": round(t_make, 1),
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        records.append(rec)
        print(f"idc ipc {a.ipc} after {steps:5d} steps: {s['mean'] * 100:.2f} +- "
              f"{s['std'] * 100:.2f} (distill {t_make:.0f} s)", flush=True)
        io.write_json(out_json, {"profile": profile, "split": "held-out", "machine": machine(),
                                 "runs": records})
    plot(records, RESULTS / f"learning-curve-{profile}.png", f"idc, IPC {a.ipc} ({profile})")


def plot(records, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    x = [r["steps"] for r in records]
    ax.errorbar(x, [r["mean"] * 100 for r in records], yerr=[r["std"] * 100 for r in records],
                marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("matching steps (outer iterations x inner steps)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    io.write_with(path, lambda p: fig.savefig(p, format="png"))


if __name__ == "__main__":
    main()
