"""Process settings a run applies once: threads, CPU allocator, determinism, backends."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from . import ops

_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning every large block to the
    OS: eager PyTorch allocates and frees many large temporaries per step, and re-faulting their
    pages costs up to half of a CPU matching step. Returns whether it applied (glibc only)."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def apply(cfg) -> dict:
    """Apply ``cfg.runtime`` and ``cfg.backend``; returns what was set (for the metrics log)."""
    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    tuned = tune_cpu_allocator() if rt.cpu_allocator == "tuned" else False
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    ops.set_backend(cfg.backend)
    return {"threads": torch.get_num_threads(), "cpu_allocator_tuned": tuned,
            "deterministic": rt.deterministic, "backends": ops.backend_table(cfg.device)}
