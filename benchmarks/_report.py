"""Reports of the accuracy protocol: the markdown table (with what each method runs), the plot
of accuracy against IPC, and the README's copy of a table."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from dasm import io

from _common import RESULTS, ROOT, table
from _methods import BASELINES, METHODS, budget_of, describe
from _records import contents

# what each dasm row is paired against: the best baseline, idc at equal compute, and the
# difficulty windows alone as real coresets (the selection DASM must add to; 15 %: the
# plan's own window)
COMPARISONS = (("best", "paired"), ("idc-compute", "paired, equal compute"),
               ("window-easy30", "paired, coreset"), ("window-easy15", "paired, coreset"))
# under soft labels, also against a random subset given the same teacher (DD-Ranking's point:
# how much of a gain the labels carry)
SOFT_COMPARISONS = COMPARISONS + (("random", "paired, same labels"),)


def soft_regime(records) -> dict | None:
    """The soft labels a results file's runs were evaluated under (regime, teacher, T), or
    None for hard labels."""
    soft = [r for r in records if r.get("labels", "hard") != "hard"]
    return soft[0] if soft else None

def report(path: Path, name: str):
    """The markdown table and the plot of every run in the results file (and the README's copy
    of the table, where it has one)."""
    records, ipcs, methods, split = contents(path)
    md = markdown(records, ipcs, methods, split)
    io.write_text(RESULTS / f"accuracy-{name}.md", md)
    if sync_readme(name, readme_part(md)):
        print(f"README.md: the accuracy-{name} block rewritten")
    plot(records, ipcs, methods, RESULTS / f"accuracy-{name}.png", f"{name} ({split} split)")
    print(md)


def readme_block(name: str) -> tuple[str, str]:
    """The markers around the README's copy of ``results/accuracy-<name>.md``."""
    return f"<!-- results/accuracy-{name}.md: written by benchmarks/accuracy.py --report -->", \
        f"<!-- end of results/accuracy-{name}.md -->"


WALL_TIMES = "\n\nWall time, minutes"  # where a report's accuracy part ends


def readme_part(md: str) -> str:
    """What the README shows of a report: the accuracies and their notes, not the wall times
    (they stay in ``results/accuracy-<name>.md``)."""
    return md.split(WALL_TIMES, 1)[0] + "\n"


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


def pooled(records, method, ipc):
    """All accuracies of ``method`` at ``ipc`` over seeds and repeats, and the seeds."""
    rs = [r for r in records if r["method"] == method and r["ipc"] == ipc]
    return [x for r in rs for x in r["accuracies"]], [r["seed"] for r in rs]


def paired(records, ipc, a="dasm", b="idc", baselines=BASELINES, seeds=None):
    """Per-seed differences ``a - b`` of the mean accuracies (points), seeds present in both
    (and in ``seeds`` when given), in seed order; ``a`` or ``b`` = "best": the best of
    ``baselines`` present for that seed."""
    by = {(r["method"], r["seed"]): r["mean"] for r in records if r["ipc"] == ipc}

    def value(method, seed):
        if method != "best":
            return by.get((method, seed))
        base = [by[(x, seed)] for x in baselines if (x, seed) in by]
        return max(base) if base else None

    out = []
    for seed in sorted({s for _, s in by} if seeds is None else seeds):
        va, vb = value(a, seed), value(b, seed)
        if va is not None and vb is not None:
            out.append((va - vb) * 100)
    return out


def full_data_line(records):
    """The full-data record with the most epochs (the evaluation protocol's), and the others."""
    full = sorted((r for r in records if r["method"] == "full-data"), key=lambda r: -r["epochs"])
    return (full[0] if full else None), full[1:]


def _mean_std(values):
    """``(mean, sample std)`` of ``values`` (n - 1, as the seed intervals; None for one value,
    which has no spread to show), or None for none."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _bar(values) -> tuple[float, float]:
    """A plotted point's ``(mean, error bar)``: no bar for one value, a gap (nan) for none."""
    ms = _mean_std(values)
    return GAP if ms is None else (ms[0], ms[1] or 0.0)


def _pm(ms, fmt: str) -> str:
    """``mean ± std`` of a :func:`_mean_std` pair in ``fmt`` (the std unsigned, two places)."""
    return format(ms[0], fmt) + ("" if ms[1] is None else f" ± {ms[1]:.2f}")


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
            row[f"IPC {ipc}"] = f"{_pm(ms, '.2f')} ({shape})" if ms else ""
            rs = [r for r in records if r["method"] == method and r["ipc"] == ipc]
            if rs:
                d = statistics.fmean(r.get("distill_seconds", 0) for r in rs) / 60
                e = statistics.fmean(r.get("eval_seconds", 0) for r in rs) / 60
                t[f"IPC {ipc}"] = f"{d:.0f} + {e:.0f}"
        rows.append(row)
        times.append(t)
    lead = [m for m in methods if m.startswith("dasm")]
    soft = soft_regime(records)
    for a in lead:
        for other, budget in (SOFT_COMPARISONS if soft else COMPARISONS):
            row = {"method": f"{a} − {'best baseline' if other == 'best' else other}",
                   "budget": budget}
            for ipc in ipcs:
                diffs = paired(records, ipc, a, other)
                d = _mean_std(diffs)
                row[f"IPC {ipc}"] = f"{_pm(d, '+.2f')} (n={len(diffs)})" if d else ""
            if any(row[f"IPC {i}"] for i in ipcs):
                rows.append(row)
    text = table(rows, cols)
    text += (f"\n\n{split} accuracy (%), last epoch, mean ± sample std (n − 1) over "
             f"(seeds × evaluation repeats); 'A − best baseline': per distillation seed, A minus "
             f"the best of {', '.join(BASELINES)} for that seed, mean ± sample std over seeds "
             f"(no ± for one seed).")
    for ipc in ipcs:  # a comparison is only as good as the baselines in it: name the absent
        have = {(r["method"], r["seed"]) for r in records if r["ipc"] == ipc}
        seeds = sorted({s for m, s in have if m in lead})
        missing = {b: [str(s) for s in seeds if (b, s) not in have] for b in BASELINES}
        absent = [f"{b} (seed {', '.join(ss)})" for b, ss in missing.items() if ss]
        if absent:
            text += f" At IPC {ipc} the best baseline leaves out {', '.join(absent)}: not run."
    if soft:
        own = [r for r in records if r["method"] == "teacher"]  # a stronger network's record
        which = (f"a {own[0]['network']}, {own[0]['mean'] * 100:.2f}% on the {split} split"
                 if own else "the full-data network below")
        text += (f"\n\nLabels: every method trained on `{soft['labels']}` soft labels of teacher "
                 f"{soft['teacher']} ({which}), KL at T = {soft['temperature']:g}, the same "
                 f"augmentation.")
    text += "\n\nMethods: " + "; ".join(f"`{m}` {describe(m)}" for m in methods) + "."
    text += "\n" + provenance(records)
    full, others = full_data_line(records)
    if full:
        text += f"\nFull training set, same network and protocol ({full['epochs']} epochs): " \
                f"{full['mean'] * 100:.2f}%" + "".join(
                    f"; {o['epochs']} epochs: {o['mean'] * 100:.2f}%" for o in others) + "."
    text += WALL_TIMES + " (distillation + evaluation, mean over seeds; two " \
            "single-thread workers side by side):\n\n" + table(times, cols)
    return text + "\n"


def provenance(records) -> str:
    """Which code on which CPU measured which records (a table may mix commits: a sweep reruns
    only what the code behind a record no longer is; and machines: the last digits of a
    measurement differ between CPUs): ``commit on CPU: method (IPCs)``, records without a
    commit last."""
    by: dict[str, dict[str, set]] = {}
    for r in records:
        commit = (r.get("commit") or "")[:7]
        where = f"{commit} on {r['cpu']}" if commit and r.get("cpu") else commit
        by.setdefault(where, {}).setdefault(r["method"], set()).add(r["ipc"])

    order = ["full-data", "teacher", *METHODS]

    def listed(methods):
        return ", ".join(m + ("" if ipcs == {None} else " (" + ", ".join(
            str(i) for i in sorted(i for i in ipcs if i is not None)) + ")")
            for m, ipcs in sorted(methods.items(), key=lambda kv: order.index(kv[0])))

    parts = [f"{c}: {listed(by[c])}" for c in sorted(c for c in by if c)]
    if "" in by:
        parts.append(f"no commit recorded (measured before records named one; a sweep reruns "
                     f"them): {listed(by[''])}")
    return ("Code behind the records, by commit and CPU where recorded (method and IPCs): "
            + "; ".join(parts) + ".")


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
        pts = [(ipc, *_bar([x * 100 for x in pooled(records, method, ipc)[0]])) for ipc in ipcs]
        if not all(math.isnan(p[1]) for p in pts):
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method,
                        lw=2.4 if method == "dasm" else 1.2)
    full, _ = full_data_line(records)
    if full:
        ax.axhline(full["mean"] * 100, color="k", ls="--", lw=1,
                   label=f"full data, {full['epochs']} epochs ({full['mean'] * 100:.1f}%)")
    for a in [m for m in main if m.startswith("dasm")]:
        for (other, _), style in zip(COMPARISONS, ("o-", "s--", "d:")):
            pts = [(ipc, *_bar(paired(records, ipc, a, other))) for ipc in ipcs]
            if not all(math.isnan(p[1]) for p in pts):
                x, y, e = zip(*pts)
                what = {"best": "best baseline", "idc-compute": "idc, equal compute"}.get(
                    other, f"{other} coreset")
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
    dx.set_ylabel("points, paired per seed (mean ± sample std)")
    dx.set_title(f"dasm − best of {', '.join(BASELINES)}", fontsize=9)
    fig.tight_layout()
    io.write_with(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)  # one process may report every results file
