"""Results files of the accuracy protocol: their records, which of them a sweep may reuse (same
config identity, protocol and code), and the locks that let two workers share them."""
from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from dasm import io

from _common import code_unchanged_since
from _methods import METHODS, budget_of

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
