"""Atomic file output: a file is either the complete new version or the old one, never half.

Everything is written to a temporary file in the destination folder and moved into place with
``os.replace``. Metrics are appended as JSON lines.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp_path)`` writes the file; it lands on ``path`` only if that succeeds."""
    with atomic_path(path) as tmp:
        writer(tmp)


def torch_save(obj: Any, path: str | Path) -> None:
    write_with(path, lambda p: torch.save(obj, p))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (a crash mid-line leaves at most one unreadable last line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
