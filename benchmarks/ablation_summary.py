"""Collect the held-out ablations (results/accuracy-<profile>-holdout-*.json) into
results/ablation-<profile>.json and .md: the choices behind the profile's defaults, measured on
held-out training images, never on the test split.

    python benchmarks/ablation_summary.py [--profile cpu-small]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, table  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="cpu-small")
    a = p.parse_args()
    rows = []
    for path in sorted(RESULTS.glob(f"accuracy-{a.profile}-holdout-*.json")):
        tag = path.stem.split("-holdout-", 1)[1]
        data = json.loads(path.read_text())
        for r in data["runs"]:
            if r["method"] == "full-data":
                continue
            rows.append({"variant": tag, "method": r["method"], "ipc": r["ipc"],
                         "held-out acc": f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f}",
                         "mean": round(r["mean"] * 100, 2), "repeats": len(r["accuracies"]),
                         "distill_s": r.get("distill_seconds"), "config_digest": r["config_digest"]})
    text = table(rows, ["variant", "method", "ipc", "held-out acc", "repeats"])
    from dasm import io
    io.write_json(RESULTS / f"ablation-{a.profile}.json", {"profile": a.profile, "rows": rows})
    io.write_text(RESULTS / f"ablation-{a.profile}.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
