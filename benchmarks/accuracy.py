"""Accuracy protocol (PROTOCOL.md): methods x IPC, evaluated identically.

    python benchmarks/accuracy.py --profile configs/profiles/cpu-small.yaml
    python benchmarks/accuracy.py --profile ... --holdout --methods idc dasm --ipc 50 \
        --set dasm.easy_drop=0.5 --tag window-0.5       # ablation on a held-out split

Methods: random (seeded real subset), idc (one segment, full pool), dasm (K segments, difficulty
pools), dasm-full-pool (segments without selection), easy / hard (real subsets by loss under a
network trained on the full training set). Every run directory is kept under
``runs/accuracy/<profile>/`` and reused when complete, so an interrupted sweep resumes.

Outputs (``--tag`` adds a suffix): ``results/accuracy-<profile>.json`` (every run: method, ipc,
seed, accuracies, wall times, config digest), ``results/accuracy-<profile>.md`` (mean +- std
table, dasm - idc gap) and ``results/accuracy-<profile>.png`` (accuracy against IPC, with the
full-data accuracy of the same evaluation network as a horizontal line). With ``--holdout`` the
test split is replaced by ``benchmark.holdout_per_class`` held-out training images per class.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dasm import api, baselines, io  # noqa: E402
from dasm.config import _apply_overrides, _parse_override, from_dict  # noqa: E402
from dasm.data import dataset_from_config  # noqa: E402
from dasm.schedule import RunDir, distill  # noqa: E402
from dasm.synthetic import SyntheticSet  # noqa: E402
from dasm.train import accuracy  # noqa: E402

from _common import RESULTS, ROOT, machine, table  # noqa: E402

METHODS = ("random", "idc", "dasm", "dasm-full-pool", "easy", "hard")
DISTILLED = {"idc": {"dasm.segments": 1},
             "dasm": {},
             "dasm-full-pool": {"dasm.easy_drop": 0.0, "dasm.hard_drop": 0.0}}


def load_profile(path: str, overrides: list[str], holdout: bool):
    raw = yaml.safe_load(Path(path).read_text()) or {}
    bench = raw.pop("benchmark", {}) or {}
    extra = dict(_parse_override(o) for o in overrides)
    if holdout:
        extra["data.holdout_per_class"] = bench.get("holdout_per_class", 1000)
    return from_dict(_apply_overrides(raw, extra)), bench


def ensure_run(run_dir: Path, make) -> tuple[SyntheticSet, float]:
    """The run's synthetic set, made by ``make()`` unless a complete one exists."""
    rd = RunDir(run_dir)
    if rd.synthetic.exists():
        return SyntheticSet.load(rd.synthetic), 0.0
    t0 = time.perf_counter()
    sset = make(resume=rd.config.exists())
    return sset, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=str(ROOT / "configs/profiles/cpu-small.yaml"))
    p.add_argument("--ipc", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--repeats", type=int)
    p.add_argument("--holdout", action="store_true", help="test on held-out training images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="")
    p.add_argument("--no-full-data", action="store_true")
    a = p.parse_args()

    base_cfg, bench = load_profile(a.profile, a.set, a.holdout)
    profile = Path(a.profile).stem
    name = profile + ("-holdout" if a.holdout else "") + (f"-{a.tag}" if a.tag else "")
    ipcs = a.ipc or bench.get("ipcs", [10, 50, 100])
    methods = a.methods or bench.get("methods", list(METHODS))
    repeats = a.repeats or base_cfg.eval.repeats
    runs_root = ROOT / "runs" / "accuracy" / name
    ds = dataset_from_config(base_cfg.data)
    print(f"{name}: {ds.name}, {len(ds.train_labels)} train / {len(ds.test_labels)} "
          f"{'held-out' if a.holdout else 'test'} images; IPC {ipcs}; methods {methods}",
          flush=True)
    t_start = time.perf_counter()
    records = []
    results_path = RESULTS / f"accuracy-{name}.json"

    # the full-data network: easy/hard selection and the horizontal line of the plot
    full = None
    need_full = any(m in ("easy", "hard") for m in methods) or not a.no_full_data
    full_epochs = bench.get("full_data_epochs", base_cfg.eval.epochs)
    if need_full:
        full_path = runs_root / "full-data-model.pt"
        from dasm.config import resolve
        cfg_full = resolve(base_cfg, ds.name, ds.image_size, torch.cuda.is_available())
        from dasm.models import build_model
        from dasm.train import eval_model_spec
        nm, opts = eval_model_spec(cfg_full)
        t0 = time.perf_counter()
        if full_path.exists():
            full = build_model(nm, ds.channels, ds.num_classes, ds.image_size,
                               generator=torch.Generator(), device=cfg_full.device, **opts)
            full.load_state_dict(torch.load(full_path, weights_only=True))
        else:
            full = baselines.full_data_model(cfg_full, ds, full_epochs, progress=True)
            io.torch_save(full.state_dict(), full_path)
        mean, std = ds.mean_std(cfg_full.device)
        full_acc = accuracy(full, ds.test_images, ds.test_labels, mean, std)
        records.append({"method": "full-data", "ipc": None, "epochs": full_epochs,
                        "accuracies": [full_acc], "mean": full_acc, "std": 0.0,
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"full-data network ({full_epochs} epochs): {full_acc * 100:.2f}%", flush=True)

    for ipc in ipcs:
        for method in methods:
            cfg = base_cfg.replace(**{"synthetic.ipc": ipc})
            out = runs_root / f"{method}-ipc{ipc}"
            if method in DISTILLED:
                cfg = cfg.replace(**DISTILLED[method])
                sset, t_make = ensure_run(out, lambda resume: distill(cfg, out, resume=resume,
                                                                      dataset=ds))
            else:
                def make(resume, method=method, cfg=cfg):
                    return baselines.run_baseline(method, cfg, out, dataset=ds,
                                                  reference_model=full)
                sset, t_make = ensure_run(out, make)
            t0 = time.perf_counter()
            summary = api.evaluate(out, repeats=repeats, dataset=ds, progress=False)
            rec = {"method": method, "ipc": ipc, "seed": cfg.seed, "factor": sset.factor,
                   "segments": sset.segment_sizes, "train_images": summary["train_images"],
                   "epochs": summary["epochs"], "accuracies": summary["accuracies"],
                   "mean": summary["mean"], "std": summary["std"],
                   "distill_seconds": round(t_make, 1),
                   "eval_seconds": round(time.perf_counter() - t0, 1),
                   "config_digest": RunDir(out).load_config().digest(), "run_dir": str(out)}
            records.append(rec)
            print(f"  ipc {ipc:4d} {method:15s} {rec['mean'] * 100:6.2f} +- "
                  f"{rec['std'] * 100:.2f}  (distill {t_make:.0f} s, eval "
                  f"{rec['eval_seconds']:.0f} s)", flush=True)
            io.write_json(results_path, {"profile": name, "machine": machine(),
                                         "runs": records, "partial": True})
    wall = time.perf_counter() - t_start
    payload = {"profile": name, "machine": machine(), "holdout": a.holdout,
               "reported": "last-epoch test accuracy, mean +- std over evaluation repeats; "
                           "equal epochs (IDC's convention)",
               "wall_seconds": round(wall, 1), "runs": records}
    io.write_json(results_path, payload)
    md = markdown(records, ipcs, methods)
    io.write_text(RESULTS / f"accuracy-{name}.md", md)
    plot(records, ipcs, methods, RESULTS / f"accuracy-{name}.png", name)
    print(md)
    print(f"sweep wall time {wall / 60:.1f} min -> {results_path}")


def markdown(records, ipcs, methods) -> str:
    by = {(r["method"], r["ipc"]): r for r in records}
    rows = []
    for method in methods:
        row = {"method": method}
        for ipc in ipcs:
            r = by.get((method, ipc))
            row[f"IPC {ipc}"] = f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f}" if r else ""
        rows.append(row)
    gap = {"method": "dasm − idc"}
    for ipc in ipcs:
        d, i = by.get(("dasm", ipc)), by.get(("idc", ipc))
        gap[f"IPC {ipc}"] = f"{(d['mean'] - i['mean']) * 100:+.2f}" if d and i else ""
    rows.append(gap)
    full = by.get(("full-data", None))
    text = table(rows, ["method"] + [f"IPC {i}" for i in ipcs])
    if full:
        text += f"\n\nfull training set, same network ({full['epochs']} epochs): " \
                f"{full['mean'] * 100:.2f}%"
    return text + "\n"


def plot(records, ipcs, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for method in methods:
        pts = sorted((r["ipc"], r["mean"] * 100, r["std"] * 100) for r in records
                     if r["method"] == method and r["ipc"] is not None)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
    full = [r for r in records if r["method"] == "full-data"]
    if full:
        ax.axhline(full[0]["mean"] * 100, color="k", ls="--", lw=1,
                   label=f"full data ({full[0]['mean'] * 100:.1f}%)")
    ax.set_xscale("log")
    ax.set_xticks(ipcs)
    ax.set_xticklabels([str(i) for i in ipcs])
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.write_with(path, lambda p: fig.savefig(p, format="png"))


if __name__ == "__main__":
    main()
