"""Accuracy protocol (docs/protocol.md): methods x IPC x distillation seeds, evaluated identically.

    python benchmarks/accuracy.py --profile configs/profiles/cpu.yaml            # test split
    python benchmarks/accuracy.py --profile configs/profiles/cpu.yaml --holdout --tag highipc \
        --ipc 1000 500 --seeds 0 --methods idc-f1 dasm-all dasm-lack ...           # ablation

Methods (:data:`METHODS`): ``random`` (seeded real subset), ``idc`` (one segment, factor 2),
``idc-f1`` (one segment, factor 1), ``idc-compute`` (idc given as many matching steps in total as
the whole dasm run at that IPC: the equal-compute budget), ``dasm`` (the package's defaults: the
plan of :mod:`dasm.plan`), ``dasm-*`` (variants: each table lists the settings each one runs),
``easy`` / ``hard`` / ``window-*`` (real subsets by loss under a full-data network, or drawn
from a difficulty window). dasm is compared
with the best of :data:`BASELINES` per distillation seed. Distillation seeds: ``--seeds`` at
every IPC, else ``benchmark.seeds`` at IPC >= 50 and the first of them below.

Every run lives in ``runs/accuracy/<name>/<method>-ipc<N>-seed<S>-<config identity>`` and is
reused when complete and made by this checkout's package code (its ``made_by.json`` names the
commit; a run of other code, or of none named, is moved to ``stale/`` and made again), with its
evaluation when ``eval.json`` holds one of the same protocol; a
record already in the results file with the same identity, epochs and repeats is reused without
``runs/`` at all (a sweep moved to a new machine runs only what is missing). A changed setting
makes new runs, never reuses stale ones.

Outputs (``--tag`` adds a suffix to the name ``<profile>[-holdout]``): ``results/accuracy-<name>
.json`` (a header with the exact command, the commit and the machine; one record per evaluated
run: method, ipc, seed, budget, accuracies as fractions, mean, std, wall seconds, config
identity), ``.md`` (mean ± sample std per method and IPC, the paired difference to the best
baseline, wall times) and ``.png`` (accuracy against IPC with the full-data line, and a panel
of dasm minus the best baseline). With ``--holdout`` the test split is replaced by
``benchmark.holdout_per_class`` held-out training images per class.

``--labels stored|teacher`` evaluates every method under the same soft labels (dasm.teacher):
one teacher, one temperature (``eval.temperature``) and the same augmentation. The teacher is
the full-data network of the profile (``eval.teacher_epochs`` 0: the full-data epochs), whose
accuracy is then the full-data line, or a stronger network (``eval.teacher_model``,
``eval.teacher_width``), recorded as method ``teacher`` beside the full-data line. The runs are
the hard-label sweep's (shared, not distilled again); ``stored`` writes the teacher's logits
into each set first. Records carry the regime and go to ``accuracy-<name>-soft-<labels>.json``,
so a hard-label table never mixes with a soft one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dasm import api, baselines, io, teacher  # noqa: E402
from dasm.rules import resolve_for  # noqa: E402
from dasm.data import dataset_from_config  # noqa: E402
from dasm.rundir import RunDir  # noqa: E402
from dasm.synthetic import SyntheticSet  # noqa: E402
from dasm.schedule import distill  # noqa: E402
from dasm.train import accuracy  # noqa: E402

from _common import (RESULTS, ROOT, code_unchanged_since, in_checkout,  # noqa: E402
                     machine, measured_on)
from _methods import (CONTENDERS, METHODS, budget_of, load_profile, subset_of,  # noqa: E402
                      run_config)
from _records import claimed, merge, recorded_runs, reusable  # noqa: E402
from _report import report  # noqa: E402


def same_labels(r: dict, soft: dict) -> bool:
    """Whether an evaluation or record ``r`` was made under the labels ``soft`` asks (its
    ``eval.*`` overrides; {} for hard labels): regime, and for soft labels teacher and T."""
    if not soft:
        return r.get("labels", "hard") == "hard"
    return (r.get("labels"), r.get("temperature"), r.get("teacher")) == \
        (soft["eval.labels"], soft["eval.temperature"], soft["key"])


def evaluation(run: RunDir, ds, repeats: int, soft: dict | None = None) -> dict:
    """The run's evaluation by the config's protocol under the labels ``soft`` asks: reused
    from eval.json when one with the same epochs, repeats and labels is there, else computed
    (and appended); ``stored`` labels are written into the set first where it lacks them."""
    cfg = run.load_config()
    soft = soft or {}
    if run.evals.exists():
        for e in api.evaluations(run):
            if e.get("epochs") == cfg.eval.epochs and len(e.get("accuracies", [])) == repeats \
                    and not e.get("same_compute") and same_labels(e, soft):
                return e
    over = {k: v for k, v in soft.items() if k != "key"}
    if soft.get("eval.labels") == "stored":
        extra = SyntheticSet.load(run.synthetic).extra
        if (extra.get("teacher"), extra.get("soft_temperature")) != \
                (soft["key"], repr(float(soft["eval.temperature"]))):
            api.relabel(run.path, over, dataset=ds, progress=False)
    return api.evaluate(run.path, repeats=repeats, dataset=ds, progress=False, overrides=over)


MADE_BY = "made_by.json"  # in a run directory: {"commit", "cpu"} of the code that made its set


def set_aside_if_stale(run: RunDir) -> None:
    """Move ``run`` (set, checkpoints, evaluations) to ``stale/`` beside it unless its
    ``made_by.json`` names a commit whose package code is this checkout's: a set made by other
    code, or by code no directory named, is made again rather than reused under the current
    commit's name. Nothing is deleted."""
    if not run.path.exists():
        return
    stamp = run.path / MADE_BY
    made = json.loads(stamp.read_text()).get("commit") if stamp.exists() else None
    if code_unchanged_since(made):
        return
    base = run.path.parent / "stale" / f"{run.path.name}.made-by-{made or 'unrecorded'}"
    aside, n = base, 0
    while aside.exists():  # set aside before: keep that one too
        n += 1
        aside = base.with_name(f"{base.name}~{n}")
    aside.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {run.path.name}: made by {made or 'an unrecorded commit'}, not this checkout's "
          f"package code: set aside in {in_checkout(aside)} and made again", flush=True)
    run.path.rename(aside)


def distill_seconds(run: RunDir) -> float:
    if not run.metrics.exists():
        return 0.0
    return round(sum(r.get("seconds", 0) for r in io.read_jsonl(run.metrics)
                     if r.get("event") == "segment_done"), 1)


def seeds_at(ipc: int, seeds: list[int], named: bool) -> list[int]:
    """Distillation seeds at ``ipc``: seeds named on the command line at every IPC; the
    profile's at IPC >= 50 and the first of them below (the protocol's one seed there)."""
    return seeds if named or ipc >= 50 else seeds[:1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=str(ROOT / "configs/profiles/cpu.yaml"))
    p.add_argument("--ipc", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--repeats", type=int)
    p.add_argument("--holdout", action="store_true", help="test on held-out training images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="")
    p.add_argument("--no-full-data", action="store_true")
    p.add_argument("--full-data-epochs", type=int,
                   help="epochs of the full-data network (default: the profile's)")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    p.add_argument("--labels", choices=teacher.REGIMES, default="hard",
                   help="labels every method is evaluated under (dasm.teacher)")
    a = p.parse_args()
    os.environ.setdefault("DASM_TEACHERS", str(ROOT / "runs" / "teachers"))  # one per identity

    base, bench = load_profile(a.profile, a.set, a.holdout)
    profile = Path(a.profile).stem
    name = profile + ("-holdout" if a.holdout else "") + (f"-{a.tag}" if a.tag else "")
    runs_root = ROOT / "runs" / "accuracy" / name  # soft regimes evaluate the same runs
    soft = {}
    if a.labels != "hard":  # every method: this teacher, temperature and augmentation
        e = base.eval
        soft = {"eval.labels": a.labels, "eval.temperature": e.temperature,
                "eval.teacher_seed": e.teacher_seed, "eval.teacher_epochs": e.teacher_epochs or
                a.full_data_epochs or bench.get("full_data_epochs", e.epochs),
                "eval.teacher_model": e.teacher_model, "eval.teacher_width": e.teacher_width}
        teacher_file = e.teacher
        base = teacher.neutral_labels(base)  # runs are named and distilled as with hard labels
        name += f"-soft-{a.labels}"
    ipcs = a.ipc or bench.get("ipcs", [10, 50, 100])
    methods = a.methods or bench.get("methods", list(CONTENDERS))
    seeds = a.seeds or bench.get("seeds", [base.seed])
    # evaluation repeats: --repeats, else the profile's; benchmark.repeats_high_ipc from
    # benchmark.high_ipc on (the protocol allows 2 where their measured spread is below 0.3)
    def repeats_at(ipc: int) -> int:
        if a.repeats:
            return a.repeats
        if "repeats_high_ipc" in bench and ipc >= bench.get("high_ipc", 500):
            return bench["repeats_high_ipc"]
        return base.eval.repeats
    ds = dataset_from_config(base.data)
    split = "held-out" if a.holdout else "test"
    print(f"{name}: {ds.name}, {len(ds.train_labels)} train / {len(ds.test_labels)} {split} "
          f"images; IPC {ipcs}; methods {methods}; seeds {seeds}", flush=True)
    t_start = time.perf_counter()
    results_path = RESULTS / f"accuracy-{name}.json"
    header = {"profile": name, "split": split, "argv": sys.argv, "machine": machine(),
              "reported": "last-epoch accuracy, mean +- std over evaluation repeats; equal "
                          "epochs (IDC's convention)", "labels": a.labels}
    if a.report:
        if not results_path.exists():
            sys.exit(f"--report: {results_path} does not exist yet (run the sweep first)")
        return report(results_path, name)

    full, line = None, False
    if soft:  # the teacher; when it is the evaluation network, its record is the full-data line
        full, rec = soft_teacher(base, soft, teacher_file, ds)
        line = rec["method"] == "full-data"
        merge(results_path, header, rec)
        print(f"teacher {soft['key']} ({rec.get('network', 'the evaluation network')}, "
              f"{rec['epochs']} epochs, {soft['eval.teacher']}): {rec['mean'] * 100:.2f}%",
              flush=True)
    if not line and (any(m in ("easy", "hard") for m in methods) or not a.no_full_data):
        full, rec = full_data(base, ds,
                              a.full_data_epochs or bench.get("full_data_epochs", base.eval.epochs),
                              recorded_runs(results_path),
                              need_model=any(m in ("easy", "hard") for m in methods))
        merge(results_path, header, rec)
        print(f"full-data network ({rec['epochs']} epochs): {rec['mean'] * 100:.2f}%", flush=True)

    for ipc in ipcs:
        for seed in seeds_at(ipc, seeds, named=bool(a.seeds)):
            for method in methods:
                cfg = run_config(base, method, ipc, seed)
                resolved = resolve_for(cfg.replace(**({"synthetic.factor": 1, "dasm.segments": 1}
                                                      if METHODS[method] is None else {})), ds)
                # distilled runs are named by what defines them, so equal configs share a run
                kind = "distill" if METHODS[method] is not None else method
                run = RunDir(runs_root / f"{kind}-ipc{ipc}-seed{seed}-{resolved.identity()}")
                with claimed(run.path.with_name(run.path.name + ".lock")):
                    merge(results_path, header, measure(run, cfg, resolved, method, ipc, seed,
                                                        ds, full, results_path, repeats_at(ipc),
                                                        soft))
    report(results_path, name)
    print(f"sweep wall time {(time.perf_counter() - t_start) / 60:.1f} min -> {results_path}")


def measure(run: RunDir, cfg, resolved, method: str, ipc: int, seed: int, ds, full,
            results_path: Path, repeats: int, soft: dict | None = None) -> dict:
    """The record of ``method`` at ``ipc`` and ``seed``: the one in the results file when it
    holds this config identity and protocol (read now: another worker may have written it
    since this one started), else the run made (or resumed) and evaluated."""
    old = reusable([r for r in recorded_runs(results_path) if same_labels(r, soft or {})],
                   method, ipc, seed, resolved, repeats)
    if old is not None:  # measured before (maybe on another machine): keep it
        print(f"  ipc {ipc:4d} seed {seed} {method:15s} {old['mean'] * 100:6.2f} (recorded)",
              flush=True)
        return old
    set_aside_if_stale(run)
    if not run.synthetic.exists():
        resume = run.config.exists()
        if resume and METHODS[method] is None:  # a baseline killed before its set was written
            shutil.rmtree(run.path)
            resume = False
        if not resume:
            io.write_json(run.path / MADE_BY, measured_on())  # the code that makes this set
        if METHODS[method] is None:
            baselines.run_baseline(subset_of(method)[0], cfg, run.path,
                                   dataset=ds, reference_model=full)
        else:
            distill(cfg, run.path, resume=resume, dataset=ds)
    s = evaluation(run, ds, repeats, soft)
    rec = {"method": method, "ipc": ipc, "seed": seed, "budget": budget_of(method),
           "accuracies": s["accuracies"], "mean": s["mean"], "std": s["std"],
           "distill_seconds": distill_seconds(run), "eval_seconds": s["seconds"],
           "segments": s["segments"], "train_images": s["train_images"],
           "epochs": s["epochs"], "config_identity": resolved.identity(),
           "argv": sys.argv[1:],  # the worker's own command (the header: the last)
           **measured_on(),
           "run_dir": str(run.path.relative_to(ROOT)), "labels": s.get("labels", "hard"),
           **({k: s[k] for k in ("temperature", "teacher")} if soft else {})}
    print(f"  ipc {ipc:4d} seed {seed} {method:15s} {rec['mean'] * 100:6.2f} +- "
          f"{rec['std'] * 100:.2f}  (distill {rec['distill_seconds']:.0f} s, eval "
          f"{rec['eval_seconds']:.0f} s)", flush=True)
    return rec


def soft_teacher(base, soft: dict, teacher_file: str, ds):
    """The teacher of every method's soft labels (``soft``: the ``eval.*`` keys of the regime;
    ``teacher_file``: ``eval.teacher`` or ''), trained once or read from its file, and its
    record: the full-data line when it is the evaluation network (returned with the network,
    which the easy/hard coresets use), else method ``teacher`` naming its network (returned
    with None: the full-data line is another network). Adds the teacher's file and identity to
    ``soft``."""
    tcfg = resolve_for(base.replace(**soft, **({"eval.teacher": teacher_file}
                                               if teacher_file else {})), ds)
    model, meta, rec = full_data_network(tcfg, ds)
    soft.update({"eval.teacher": meta["path"], "key": meta["identity"]})
    if teacher.is_evaluation_network(tcfg):
        return model, rec
    return None, {**rec, "method": "teacher",
                  "network": f"{meta['model']} {meta['model_options']}"}


def full_data(base, ds, epochs: int, recorded: list[dict] = (), need_model: bool = True):
    """The evaluation network trained on the whole training set, and its record. It is the
    soft-label teacher of the same identity (:mod:`dasm.teacher`: one safetensors file per
    identity, trained once, whichever regime asks first). A record of the same key already in
    the results file is reused when the network itself is not needed (``need_model``: the
    easy/hard coresets): returns ``(None, record)`` then."""
    cfg = teacher.neutral_labels(resolve_for(base, ds))  # the evaluation network, whatever
    tcfg = cfg.replace(**{"eval.teacher": "", "eval.teacher_seed": cfg.seed,
                          "eval.teacher_epochs": epochs})
    # keyed by what defines this network (data, model, evaluation protocol, seed), not by the
    # matching settings, so every method of a sweep shares it (a teacher's identity)
    key = teacher.protocol_key(teacher.teacher_config(tcfg))
    for r in recorded:
        if r["method"] == "full-data" and r.get("key") == key and r.get("epochs") == epochs \
                and not need_model and code_unchanged_since(r.get("commit")):
            return None, r
    model, _, rec = full_data_network(tcfg, ds)
    return model, rec


def full_data_network(tcfg, ds):
    """The teacher ``tcfg`` names (trained once, under a lock, or read from its file), its
    metadata, and its record: the full-data line (hard labels)."""
    t0 = time.perf_counter()
    with claimed(teacher.teacher_path(tcfg).with_suffix(".lock")):  # trained once
        model, meta = teacher.load_or_train(tcfg, ds, progress=True)
    acc = float(meta["accuracy"])
    return model, meta, {"method": "full-data", "ipc": None, "seed": tcfg.eval.teacher_seed,
                         "budget": None, "key": meta["identity"],
                         "epochs": tcfg.eval.teacher_epochs or tcfg.eval.epochs,
                         "accuracies": [acc], "mean": acc, "std": 0.0, **measured_on(),
                         "labels": "hard", "teacher": in_checkout(meta["path"]),
                         "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    main()
