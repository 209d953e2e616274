"""What a set's stored soft labels carry: how often the teacher's top class is the image's own
label, and how much probability the own class keeps at T = 1 and at the set's temperature.

    python benchmarks/soft_label_stats.py runs/accuracy/cpu/random-ipc1000-seed0-*/

Prints a table and writes it under the run's name into ``results/soft-label-stats.json`` (with
the command, commit and machine). A set without stored labels (``dasm relabel``) is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import in_checkout, table, update_results  # noqa: E402

from dasm.rundir import RunDir  # noqa: E402
from dasm.synthetic import SyntheticSet  # noqa: E402


def stats(sset: SyntheticSet) -> dict:
    """``sset.soft`` ([N, K] teacher logits, one row per decoded image) against the set's own
    labels: the share whose top class is the label, and the mean probability of the label and
    of the top class, at T = 1 and at the stored temperature."""
    if sset.soft is None:
        raise SystemExit("the set holds no stored soft labels: run `dasm relabel` on it first")
    logits = sset.soft.float()
    labels = torch.arange(sset.images.shape[0]).repeat_interleave(sset.decoded_per_class)
    if labels.shape[0] != logits.shape[0]:
        raise SystemExit(f"{logits.shape[0]} soft labels for {labels.shape[0]} images")
    T = float(sset.extra.get("soft_temperature", 1.0))
    rows = torch.arange(labels.shape[0])
    out = {"images": int(labels.shape[0]), "teacher": sset.extra.get("teacher"),
           "temperature": T, "top_is_label": float((logits.argmax(1) == labels).float().mean())}
    for t in sorted({1.0, T}):
        p = F.softmax(logits / t, dim=1)
        out[f"label_prob_T{t:g}"] = float(p[rows, labels].mean())
        out[f"top_prob_T{t:g}"] = float(p.max(1).values.mean())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with stored soft labels")
    a = p.parse_args()
    rows = []
    for path in a.runs:
        run = RunDir(path)
        s = stats(SyntheticSet.load(run.synthetic))
        name = in_checkout(path)
        update_results("soft-label-stats.json", name, {**s, "argv": sys.argv})
        rows.append({"run": name, **{k: (f"{v:.3f}" if isinstance(v, float) else v)
                                     for k, v in s.items()}})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
