"""Rebuild every accuracy report from its records: ``results/accuracy-<name>.md``, its plot and
the README's copy of the table, for each ``results/accuracy-<name>.json``. Run it after a change
to how reports are written (``_report.py``); it measures nothing.

    python benchmarks/reports.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from _report import report  # noqa: E402


def main():
    paths = sorted(RESULTS.glob("accuracy-*.json"))
    for path in paths:
        report(path, path.stem.removeprefix("accuracy-"))
    print(f"{len(paths)} reports rebuilt in {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
