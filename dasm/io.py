"""Atomic file output: a file is either the complete new version or the old one, never half.

Everything is written to a temporary file in the destination folder
(``.<name>.<pid>.<random>.tmp``) and moved into place with ``os.replace``, with the permissions
the umask gives a new file. Metrics are appended as JSON lines. safetensors and torch files are
written here, byte for byte the same for the same content (the safetensors library orders
metadata by hash; torch.save puts the file's name inside). YAML is read here, a key given twice
refused.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


WRITER = re.compile(r"\.(\d+)\.[^.]+" + re.escape(TMP_SUFFIX) + "$")  # .<name>.<pid>.<random>.tmp


def _tmp_prefix(path: Path) -> str:
    """Temporary files carry the writer's process id, so a dead writer's are known at once."""
    return f".{path.name}.{os.getpid()}."


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, older_than_s: float = 60.0) -> list[Path]:
    """Delete temporary files of :func:`atomic_path`'s naming in ``folder`` left by a killed
    write: at once when the process that wrote it has gone, else (a name without a process id,
    or one of a live writer that may be on another machine) only when older than
    ``older_than_s``, so a concurrent writer's live file is spared."""
    folder, now, gone = Path(folder), time.time(), []
    if not folder.is_dir():
        return gone
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        writer = WRITER.search(p.name)
        try:
            dead = writer is not None and not _writer_alive(int(writer.group(1)))
            if p.is_file() and (dead or now - p.stat().st_mtime > older_than_s):
                p.unlink()
                gone.append(p)
        except OSError:
            pass
    return gone


def check_writable(path: str | Path, append: bool = False) -> None:
    """Raise OSError naming ``path`` unless a file (or folder) can be put there as
    :func:`atomic_path` does: a temporary file is made and removed at once in the nearest
    folder of ``path`` that exists. With ``append`` an existing ``path`` must open for appending
    (its content is untouched). Nothing is left behind."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
        if append and path.is_file():
            open(path, "a").close()
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like open()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tag runs code), with a key given twice in a mapping an error
    instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: PyYAML reports it below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """The YAML document ``text`` read by :class:`StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp_path)`` writes the file; it lands on ``path`` only if that succeeds."""
    with atomic_path(path) as tmp:
        writer(tmp)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save``'s encoding of ``obj``, the same bytes for the same object: saved to a
    buffer, its archive is named ``archive`` (saved to a file, it takes the file's name, and the
    temporary file's random name would end up inside)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def torch_save(obj: Any, path: str | Path) -> None:
    """Write ``torch.save(obj)`` atomically and deterministically."""
    payload = torch_bytes(obj)
    write_with(path, lambda p: p.write_bytes(payload))


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of ``tensors`` (CPU, contiguous) with string ``metadata``, keys
    sorted: the same inputs give the same bytes."""
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically and deterministically."""
    payload = safetensors_bytes(tensors, metadata)
    write_with(path, lambda p: p.write_bytes(payload))


@contextlib.contextmanager
def locked_folder(folder: str | Path):
    """Hold an exclusive lock on ``folder`` (POSIX flock on the directory itself: no lock file
    is left behind) for a read-modify-write of a file in it that other processes may share."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
