"""Helpers shared by the benchmarks: machine description, results files, tables."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# where results files go: results/ of the checkout, or DASM_RESULTS (a sweep run from a frozen
# worktree of one commit writes into the main checkout's results/)
RESULTS = Path(os.environ.get("DASM_RESULTS", ROOT / "results"))
CODE_PATHS = ("dasm", "kernels", "csrc")  # what a record's numbers depend on


def commit() -> str:
    """The checked-out commit (short hash), "" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def code_unchanged_since(rev: str | None) -> bool:
    """Whether the package code (:data:`CODE_PATHS`) of this checkout, work tree included, is
    the code of commit ``rev``: a record made there still describes it. False without a
    commit, or where git does not know ``rev``."""
    if not rev:
        return False
    try:
        r = subprocess.run(["git", "diff", "--quiet", rev, "--", *CODE_PATHS], cwd=ROOT,
                           capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


def in_checkout(path) -> str:
    """``path`` relative to the checkout where it lies inside it (a record names no machine's
    folders), else as given."""
    p = Path(path).absolute()  # not resolved: a linked runs/ still counts as inside
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def cpu_name() -> str:
    """This machine's CPU model as /proc/cpuinfo names it (float rounding, and so the last
    digits of a measurement, differ between CPUs: every record names its own)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def measured_on() -> dict:
    """What a record names of where it was measured: the commit (a sweep reuses the record only
    while the package code is this commit's) and the CPU."""
    return {"commit": commit(), "cpu": cpu_name()}


def machine() -> dict:
    info = {"argv": sys.argv, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return {**info, **measured_on()}


def update_results(name: str, key: str, value) -> Path:
    """Set ``key`` in ``results/<name>`` (JSON), atomically, keeping the other keys."""
    from dasm import io

    path = RESULTS / name
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    data.setdefault("machines", {})[key] = machine()
    io.write_json(path, data)
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r.get(c, "") for c in cols]) for r in rows]
    return "\n".join(out)
