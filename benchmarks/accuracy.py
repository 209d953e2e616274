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
with the best of :data:`BASELINES` per distillation seed. Distillation seeds come from
``benchmark.seeds`` at IPC >= 50 (the first one below).

Every run lives in ``runs/accuracy/<name>/<method>-ipc<N>-seed<S>-<config identity>`` and is
reused when complete, with its evaluation when ``eval.json`` holds one of the same protocol; a
record already in the results file with the same identity, epochs and repeats is reused without
``runs/`` at all (a sweep moved to a new machine runs only what is missing). A changed setting
makes new runs, never reuses stale ones.

Outputs (``--tag`` adds a suffix to the name ``<profile>[-holdout]``): ``results/accuracy-<name>
.json`` (a header with the exact command, the commit and the machine; one record per evaluated
run: method, ipc, seed, budget, accuracies as fractions, mean, std, wall seconds, config
identity), ``.md`` (mean ± std per method and IPC, the paired difference to the best baseline,
wall times) and ``.png`` (accuracy against IPC with the full-data line, and a panel of dasm minus
the best baseline). With ``--holdout`` the test split is replaced by
``benchmark.holdout_per_class`` held-out training images per class.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dasm import api, baselines, io, rng  # noqa: E402
from dasm.config import from_dict, parse_overrides, with_overrides  # noqa: E402
from dasm.rules import resolve_for  # noqa: E402
from dasm.data import dataset_from_config  # noqa: E402
from dasm.plan import iterations_for, segment_sizes  # noqa: E402
from dasm.rundir import RunDir, load_tensors  # noqa: E402
from dasm.schedule import distill  # noqa: E402
from dasm.train import accuracy  # noqa: E402

from _common import RESULTS, ROOT, code_unchanged_since, commit, machine, table  # noqa: E402

# method -> config overrides of a distilled run (None: a real-subset baseline). Every table
# lists what each method it shows runs (:func:`describe`), so a name needs no history.
BAND_SCORER = {"dasm.match_init": "scorer", "dasm.easy_drop": 0.5, "dasm.hard_drop": 0.02,
               "dasm.pool": "rank", "synthetic.factor": 2}  # a rank band + scorer warm starts
F1 = {"synthetic.factor": 1}
METHODS = {
    "random": None,
    "idc": {"dasm.segments": 1, "synthetic.factor": 2},  # IDC as published (factor 2)
    "idc-f1": {"dasm.segments": 1, "synthetic.factor": 1},  # IDC-I: full-resolution images
    "idc-compute": {"dasm.segments": 1},  # dasm's first-segment factor; iterations: dasm's total
    "dasm": {},  # the package's defaults (the plan of dasm.plan)
    # two halves at factor 1 with each piece of the large-phi plan alone, and all together
    "dasm-f1": {**F1, "dasm.pool": "rank", "dasm.match_init": "fresh"},
    "dasm-lack": {**F1, "dasm.pool": "lack", "dasm.match_init": "fresh"},
    "dasm-cond": {**F1, "dasm.pool": "rank", "dasm.match_init": "conditioned"},
    "dasm-all": {**F1, "dasm.pool": "lack", "dasm.match_init": "conditioned"},
    "dasm-mixed": {"synthetic.factor": [2, 1], "dasm.pool": "lack",
                   "dasm.match_init": "conditioned"},
    "dasm-split": {**F1, "dasm.pool": "lack", "dasm.match_init": "conditioned"},  # 3/4 + 1/4
    "dasm-fill": {**F1, "dasm.pool": "lack", "dasm.match_init": "fresh",
                  "dasm.lack_fill": "margin"},
    "dasm-f2": {"synthetic.factor": 2, "dasm.pool": "rank", "dasm.match_init": "fresh"},
    "dasm-design": BAND_SCORER,
    "dasm-fresh": {**BAND_SCORER, "dasm.match_init": "fresh"},
    "dasm-no-band": {**BAND_SCORER, "dasm.easy_drop": 0.0, "dasm.hard_drop": 0.0},
    "dasm-no-parity": {**BAND_SCORER, "dasm.step_parity": False},
    "dasm-k3": {"dasm.segments": 3},  # three segments (IPC divisible by 3: near-equal list)
    # the high-IPC switches (results/ablation-highipc-switches.json): a difficulty window cut
    # by a cross-fitted network (the easiest 30 % or 15 %, or the hardest 10 %, of each class;
    # for every segment, or later segments only), the window alone as a real coreset, lack
    # candidates a real-data network knows (CCFS), and a partial update (20 % distilled)
    "dasm-window-easy30": {"dasm.window_easy": 0.3},
    "dasm-window-easy30-later": {"dasm.window_easy": 0.3, "dasm.window_first": False},
    "dasm-window-easy15": {"dasm.window_easy": 0.15},
    "dasm-window-hard10": {"dasm.window_hard": 0.1},
    "dasm-known": {"dasm.lack_known": True},
    "dasm-distill20": {"dasm.distill_share": 0.2},
    "window-easy30": None,
    "easy": None,
    "hard": None,
}
# real-subset baselines: (baselines.METHODS name, settings)
SUBSETS = {"window-easy30": ("window", {"dasm.window_easy": 0.3})}
CONTENDERS = ("random", "idc", "idc-f1", "idc-compute", "dasm")
BASELINES = ("random", "idc", "idc-f1")  # dasm is compared with the best of them


def load_profile(path: str, overrides: list[str], holdout: bool):
    """``(Config, benchmark settings)`` of a profile file; ``holdout`` tests on held-out images."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    bench = raw.pop("benchmark", {}) or {}
    extra = parse_overrides(overrides)
    if holdout:  # an explicit --set data.holdout_per_class wins (small sets: digits)
        extra.setdefault("data.holdout_per_class", bench.get("holdout_per_class", 1000))
    return from_dict(with_overrides(raw, extra)), bench


def run_config(base, method: str, ipc: int, seed: int):
    """The config of ``method`` at ``ipc`` and distillation ``seed``."""
    cfg = base.replace(**{"synthetic.ipc": ipc, "seed": seed})
    over = dict(METHODS[method] or SUBSETS.get(method, (method, {}))[1])
    if method == "dasm-k3":
        over["dasm.segments"] = [ipc - 2 * (ipc // 3), ipc // 3, ipc // 3]
    if method == "dasm-split":
        over["dasm.segments"] = [ipc - ipc // 4, ipc // 4]
    if method == "idc-compute":
        K = len(segment_sizes(ipc, cfg.dasm.segments))
        over["match.iterations"] = sum(iterations_for(cfg.dasm, cfg.match.iterations, k, K)
                                       for k in range(K))
    return cfg.replace(**over)


RUN_CONFIG_NOTES = {"dasm-split": "segments 3/4 + 1/4", "dasm-k3": "three near-equal segments",
                    "idc-compute": "matching steps: the whole dasm run's"}


def describe(method: str) -> str:
    """What ``method`` runs, in settings: its overrides of the profile, or the subset it draws."""
    if METHODS[method] is None:
        base, over = SUBSETS.get(method, (method, {}))
        what = {"random": "a seeded random real subset", "easy": "the lowest-loss real images",
                "hard": "the highest-loss real images", "window": "a seeded random real subset "
                "of the difficulty window"}.get(base, base)
        return what + "".join(f", {k}={v}" for k, v in over.items())
    parts = [f"{k}={v}" for k, v in METHODS[method].items()]
    parts += [RUN_CONFIG_NOTES[method]] if method in RUN_CONFIG_NOTES else []
    return ", ".join(parts) or "the package's defaults"


def budget_of(method: str) -> str:
    return "equal-compute" if method == "idc-compute" else "equal-steps"


def evaluation(run: RunDir, ds, repeats: int) -> dict:
    """The run's evaluation by the config's protocol: reused from eval.json when one with the
    same epochs and repeats is there, else computed (and appended)."""
    cfg = run.load_config()
    if run.evals.exists():
        for e in api.evaluations(run):
            if e.get("epochs") == cfg.eval.epochs and len(e.get("accuracies", [])) == repeats \
                    and not e.get("same_compute"):
                return e
    return api.evaluate(run.path, repeats=repeats, dataset=ds, progress=False)


def distill_seconds(run: RunDir) -> float:
    if not run.metrics.exists():
        return 0.0
    return round(sum(r.get("seconds", 0) for r in io.read_jsonl(run.metrics)
                     if r.get("event") == "segment_done"), 1)


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
    a = p.parse_args()

    base, bench = load_profile(a.profile, a.set, a.holdout)
    profile = Path(a.profile).stem
    name = profile + ("-holdout" if a.holdout else "") + (f"-{a.tag}" if a.tag else "")
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
    runs_root = ROOT / "runs" / "accuracy" / name
    ds = dataset_from_config(base.data)
    split = "held-out" if a.holdout else "test"
    print(f"{name}: {ds.name}, {len(ds.train_labels)} train / {len(ds.test_labels)} {split} "
          f"images; IPC {ipcs}; methods {methods}; seeds {seeds}", flush=True)
    t_start = time.perf_counter()
    results_path = RESULTS / f"accuracy-{name}.json"
    header = {"profile": name, "split": split, "argv": sys.argv, "machine": machine(),
              "reported": "last-epoch accuracy, mean +- std over evaluation repeats; equal "
                          "epochs (IDC's convention)"}
    if a.report:
        if not results_path.exists():
            sys.exit(f"--report: {results_path} does not exist yet (run the sweep first)")
        return report(results_path, name)

    full = None
    if any(m in ("easy", "hard") for m in methods) or not a.no_full_data:
        full, rec = full_data(base, ds, runs_root,
                              a.full_data_epochs or bench.get("full_data_epochs", base.eval.epochs),
                              recorded_runs(results_path),
                              need_model=any(m in ("easy", "hard") for m in methods))
        merge(results_path, header, rec)
        print(f"full-data network ({rec['epochs']} epochs): {rec['mean'] * 100:.2f}%", flush=True)

    for ipc in ipcs:
        for seed in (seeds if ipc >= 50 else seeds[:1]):
            for method in methods:
                cfg = run_config(base, method, ipc, seed)
                resolved = resolve_for(cfg.replace(**({"synthetic.factor": 1, "dasm.segments": 1}
                                                      if METHODS[method] is None else {})), ds)
                # distilled runs are named by what defines them, so equal configs share a run
                kind = "distill" if METHODS[method] is not None else method
                run = RunDir(runs_root / f"{kind}-ipc{ipc}-seed{seed}-{resolved.identity()}")
                with claimed(run.path.with_name(run.path.name + ".lock")):
                    merge(results_path, header, measure(run, cfg, resolved, method, ipc, seed,
                                                        ds, full, results_path, repeats_at(ipc)))
    report(results_path, name)
    print(f"sweep wall time {(time.perf_counter() - t_start) / 60:.1f} min -> {results_path}")


@contextlib.contextmanager
def locked(lock_path: Path, busy: str = ""):
    """An exclusive ``flock`` on ``lock_path``, held for the block and released when the process
    ends, even killed; ``busy`` is printed when another process holds it and this one waits."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy:
                print(busy, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def claimed(lock_path: Path):
    """Hold one run for this worker while it makes it. A second worker on the same run (sweeps
    side by side, or two methods with equal configs) waits here, then finds the first one's
    record."""
    return locked(lock_path, f"  {lock_path.stem}: another worker is making it; waiting")


def measure(run: RunDir, cfg, resolved, method: str, ipc: int, seed: int, ds, full,
            results_path: Path, repeats: int) -> dict:
    """The record of ``method`` at ``ipc`` and ``seed``: the one in the results file when it
    holds this config identity and protocol (read now: another worker may have written it
    since this one started), else the run made (or resumed) and evaluated."""
    old = reusable(recorded_runs(results_path), method, ipc, seed, resolved, repeats)
    if old is not None:  # measured before (maybe on another machine): keep it
        print(f"  ipc {ipc:4d} seed {seed} {method:15s} {old['mean'] * 100:6.2f} (recorded)",
              flush=True)
        return old
    if not run.synthetic.exists():
        resume = run.config.exists()
        if METHODS[method] is None:
            if resume:  # a baseline killed before its set was written: redo it
                shutil.rmtree(run.path)
            baselines.run_baseline(SUBSETS.get(method, (method,))[0], cfg, run.path,
                                   dataset=ds, reference_model=full)
        else:
            distill(cfg, run.path, resume=resume, dataset=ds)
    s = evaluation(run, ds, repeats)
    rec = {"method": method, "ipc": ipc, "seed": seed, "budget": budget_of(method),
           "accuracies": s["accuracies"], "mean": s["mean"], "std": s["std"],
           "distill_seconds": distill_seconds(run), "eval_seconds": s["seconds"],
           "segments": s["segments"], "train_images": s["train_images"],
           "epochs": s["epochs"], "config_identity": resolved.identity(),
           "argv": sys.argv[1:],  # the worker's own command (the header: the last)
           "commit": commit(),  # reused only while the package code is this commit's
           "run_dir": str(run.path.relative_to(ROOT))}
    print(f"  ipc {ipc:4d} seed {seed} {method:15s} {rec['mean'] * 100:6.2f} +- "
          f"{rec['std'] * 100:.2f}  (distill {rec['distill_seconds']:.0f} s, eval "
          f"{rec['eval_seconds']:.0f} s)", flush=True)
    return rec


def recorded_runs(results_path: Path) -> list[dict]:
    """The records of a results file as it is now ([] before its first record)."""
    return json.loads(results_path.read_text())["runs"] if results_path.exists() else []


def reusable(records: list[dict], method: str, ipc: int, seed: int, cfg, repeats: int):
    """The record of ``method`` at ``ipc`` and ``seed`` already in the results file when it
    was measured with this config identity and protocol (evaluation epochs and repeats) on
    code that is still this checkout's (the record's commit; a record without one is not
    reused), else None: a sweep on a new machine (no ``runs/``) reruns only what is missing,
    and a changed plan or engine reruns what it touches."""
    for r in records:
        if (r["method"], r["ipc"], r.get("seed"), r.get("budget")) == \
                (method, ipc, seed, budget_of(method)) \
                and r.get("config_identity") == cfg.identity() \
                and r.get("epochs") == cfg.eval.epochs and len(r["accuracies"]) == repeats \
                and code_unchanged_since(r.get("commit")):
            return r
    return None


def merge(path: Path, header: dict, record: dict) -> None:
    """Put ``record`` into the results file, replacing the one of the same method, IPC, seed
    and budget; under a lock, so that sweeps run side by side do not lose each other's runs."""
    with locked(path.with_suffix(".lock")):
        data = json.loads(path.read_text()) if path.exists() else {}
        key = lambda r: (r["method"], r["ipc"], r.get("seed"), r.get("budget"),  # noqa: E731
                         r.get("epochs") if r["method"] == "full-data" else None)
        runs = [r for r in data.get("runs", []) if key(r) != key(record)] + [record]
        runs.sort(key=lambda r: (r["ipc"] or 0, r["method"], r.get("seed") or 0))
        io.write_json(path, {**header, "runs": runs})


def contents(path: Path) -> tuple[list[dict], list[int], list[str], str]:
    """A results file's records, IPCs, methods (every worker's, in :data:`METHODS` order) and
    split."""
    data = json.loads(path.read_text())
    records = data["runs"]
    present = {r["method"] for r in records}
    methods = [m for m in METHODS if m in present]
    ipcs = sorted({r["ipc"] for r in records if r["ipc"] is not None})
    return records, ipcs, methods, data.get("split", "test")


def report(path: Path, name: str):
    """The markdown table and the plot of every run in the results file (and the README's copy
    of the table, where it has one)."""
    records, ipcs, methods, split = contents(path)
    md = markdown(records, ipcs, methods, split)
    io.write_text(RESULTS / f"accuracy-{name}.md", md)
    if sync_readme(name, md):
        print(f"README.md: the accuracy-{name} block rewritten")
    plot(records, ipcs, methods, RESULTS / f"accuracy-{name}.png", f"{name} ({split} split)")
    print(md)


def readme_block(name: str) -> tuple[str, str]:
    """The markers around the README's copy of ``results/accuracy-<name>.md``."""
    return f"<!-- results/accuracy-{name}.md: written by benchmarks/accuracy.py --report -->", \
        f"<!-- end of results/accuracy-{name}.md -->"


def sync_readme(name: str, md: str, path: Path = ROOT / "README.md") -> bool:
    """Put ``md`` between the README's markers of ``name`` (see :func:`readme_block`), so that
    the figures a user reads are the results file's; False when the README has no such block."""
    begin, end = readme_block(name)
    text = path.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{md}{end}{tail}"
    if new != text:
        io.write_text(path, new)
    return True


def full_data(base, ds, runs_root: Path, epochs: int, recorded: list[dict] = (),
              need_model: bool = True):
    """The evaluation network trained on the whole training set (cached), and its record. A
    record of the same key already in the results file is reused when the network itself is
    not needed (``need_model``: the easy/hard coresets): returns ``(None, record)`` then."""
    cfg = resolve_for(base, ds)
    # keyed by what defines this network (data, model, evaluation protocol, seed), not by the
    # matching settings, so every method of a sweep shares it
    d = cfg.to_dict()
    key = rng.derive_seed(0, json.dumps({k: d[k] for k in ("data", "model", "eval", "seed")},
                                        sort_keys=True))
    for r in recorded:
        if r["method"] == "full-data" and r.get("key") == f"{key:016x}" and \
                r.get("epochs") == epochs and not need_model and \
                code_unchanged_since(r.get("commit")):
            return None, r
    path = runs_root / f"full-data-model-{epochs}ep-{key:016x}.pt"
    t0 = time.perf_counter()
    if path.exists():
        from dasm.models import build_model
        from dasm.train import eval_model_spec

        nm, opts = eval_model_spec(cfg)
        model = build_model(nm, ds.channels, ds.num_classes, ds.image_size,
                            generator=torch.Generator(), device=cfg.device, **opts)
        model.load_state_dict(load_tensors(path, "delete it to train the network again"))
    else:
        model = baselines.full_data_model(cfg, ds, epochs, progress=True)
        io.torch_save(model.state_dict(), path)
    mean, std = ds.mean_std(cfg.device)
    acc = accuracy(model, ds.test_images, ds.test_labels, mean, std)
    return model, {"method": "full-data", "ipc": None, "seed": cfg.seed, "budget": None,
                   "key": f"{key:016x}", "epochs": epochs, "accuracies": [acc], "mean": acc,
                   "std": 0.0, "commit": commit(),
                   "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- reports
def pooled(records, method, ipc):
    """All accuracies of ``method`` at ``ipc`` over seeds and repeats, and the seeds."""
    rs = [r for r in records if r["method"] == method and r["ipc"] == ipc]
    return [x for r in rs for x in r["accuracies"]], [r["seed"] for r in rs]


def paired(records, ipc, a="dasm", b="idc"):
    """Per-seed differences ``a - b`` of the mean accuracies (points), seeds present in both;
    ``b = "best"``: the best of :data:`BASELINES` present for that seed."""
    by = {(r["method"], r["seed"]): r["mean"] for r in records if r["ipc"] == ipc}
    if b == "best":
        out = []
        for (m, seed), v in by.items():
            base = [by[(x, seed)] for x in BASELINES if (x, seed) in by]
            if m == a and base:
                out.append((v - max(base)) * 100)
        return out
    return [(by[(a, s)] - by[(b, s)]) * 100 for (m, s) in by if m == a and (b, s) in by]


def full_data_line(records):
    """The full-data record with the most epochs (the evaluation protocol's), and the others."""
    full = sorted((r for r in records if r["method"] == "full-data"), key=lambda r: -r["epochs"])
    return (full[0] if full else None), full[1:]


def _mean_std(values):
    if not values:
        return None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def markdown(records, ipcs, methods, split) -> str:
    cols = ["method", "budget"] + [f"IPC {i}" for i in ipcs]
    rows, times = [], []
    for method in methods:
        row = {"method": method,
               "budget": budget_of(method) if METHODS[method] is not None else "-"}
        t = {"method": method, "budget": "min"}
        for ipc in ipcs:
            accs, seeds = pooled(records, method, ipc)
            ms = _mean_std([x * 100 for x in accs])
            shape = f"{len(seeds)}×{len(accs) // max(len(seeds), 1)}"  # seeds x repeats
            row[f"IPC {ipc}"] = f"{ms[0]:.2f} ± {ms[1]:.2f} ({shape})" if ms else ""
            rs = [r for r in records if r["method"] == method and r["ipc"] == ipc]
            if rs:
                d = statistics.fmean(r.get("distill_seconds", 0) for r in rs) / 60
                e = statistics.fmean(r.get("eval_seconds", 0) for r in rs) / 60
                t[f"IPC {ipc}"] = f"{d:.0f} + {e:.0f}"
        rows.append(row)
        times.append(t)
    lead = [m for m in methods if m.startswith("dasm")]
    for a in lead:
        for other, budget in (("best", "paired"), ("idc-compute", "paired, equal compute")):
            row = {"method": f"{a} − {'best baseline' if other == 'best' else other}",
                   "budget": budget}
            for ipc in ipcs:
                diffs = paired(records, ipc, a, other)
                d = _mean_std(diffs)
                row[f"IPC {ipc}"] = f"{d[0]:+.2f} ± {d[1]:.2f} (n={len(diffs)})" if d else ""
            if any(row[f"IPC {i}"] for i in ipcs):
                rows.append(row)
    text = table(rows, cols)
    text += (f"\n\n{split} accuracy (%), last epoch, mean ± std over (seeds × evaluation repeats); "
             f"'A − best baseline': per distillation seed, A minus the best of "
             f"{', '.join(BASELINES)} for that seed, mean ± std over seeds.")
    for ipc in ipcs:  # a comparison is only as good as the baselines in it: name the absent
        have = {(r["method"], r["seed"]) for r in records if r["ipc"] == ipc}
        seeds = sorted({s for m, s in have if m in lead})
        missing = {b: [str(s) for s in seeds if (b, s) not in have] for b in BASELINES}
        absent = [f"{b} (seed {', '.join(ss)})" for b, ss in missing.items() if ss]
        if absent:
            text += f" At IPC {ipc} the best baseline leaves out {', '.join(absent)}: not run."
    text += "\n\nMethods: " + "; ".join(f"`{m}` {describe(m)}" for m in methods) + "."
    full, others = full_data_line(records)
    if full:
        text += f"\nFull training set, same network and protocol ({full['epochs']} epochs): " \
                f"{full['mean'] * 100:.2f}%" + "".join(
                    f"; {o['epochs']} epochs: {o['mean'] * 100:.2f}%" for o in others) + "."
    text += "\n\nWall time, minutes (distillation + evaluation, mean over seeds; two " \
            "single-thread workers side by side):\n\n" + table(times, cols)
    return text + "\n"


GAP = (float("nan"), float("nan"))  # a point not measured: the plot's line breaks there


def plot(records, ipcs, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [m for m in methods if m not in ("easy", "hard")]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120,
                                 gridspec_kw={"width_ratios": [3, 2]})
    for method in main:
        # a gap (nan) where a method has no run, so no line suggests a point not measured
        pts = [(ipc, *(_mean_std([x * 100 for x in pooled(records, method, ipc)[0]]) or GAP))
               for ipc in ipcs]
        if not all(math.isnan(p[1]) for p in pts):
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method,
                        lw=2.4 if method == "dasm" else 1.2)
    full, _ = full_data_line(records)
    if full:
        ax.axhline(full["mean"] * 100, color="k", ls="--", lw=1,
                   label=f"full data, {full['epochs']} epochs ({full['mean'] * 100:.1f}%)")
    for a in [m for m in main if m.startswith("dasm")]:
        for other, style in (("best", "o-"), ("idc-compute", "s--")):
            pts = [(ipc, *(_mean_std(paired(records, ipc, a, other)) or GAP)) for ipc in ipcs]
            if not all(math.isnan(p[1]) for p in pts):
                x, y, e = zip(*pts)
                what = "best baseline" if other == "best" else "idc, equal compute"
                dx.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=f"{a} − {what}")
    dx.axhline(0, color="k", lw=0.8)
    for a_ in (ax, dx):
        a_.set_xscale("log")
        a_.minorticks_off()
        a_.set_xticks(ipcs)
        a_.set_xticklabels([str(i) for i in ipcs])
        a_.set_xlabel("images per class (IPC)")
        a_.grid(alpha=0.3)
        a_.legend(fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    dx.set_ylabel("points, paired per seed (mean ± std)")
    dx.set_title(f"dasm − best of {', '.join(BASELINES)}", fontsize=9)
    fig.tight_layout()
    io.write_with(path, lambda p: fig.savefig(p, format="png"))


if __name__ == "__main__":
    main()
