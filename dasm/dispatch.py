"""Which backend serves each hot op: the backends and what each implements, the forced choice
(``DASM_BACKEND``, the config key ``backend``, :func:`override`), whether a backend can run an
op here, and ``auto``'s pick (on CUDA by measurement, :mod:`dasm.autotable`). The ops
themselves are in :mod:`dasm.ops`."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from typing import Callable

import torch

from ._ext import ext, ext_error
from . import reference as ref
from .errors import BackendUnavailable, ConfigError

BACKENDS = ("reference", "triton", "ext", "compile")
OPS = ("decode_augment", "grad_distance", "sample_scores", "accumulate_class_grads",
       "instance_norm_relu_pool")
# Which backends implement each op, in the order ``auto`` tries them.
IMPLEMENTED = {
    "decode_augment": ("triton", "compile", "reference"),
    "grad_distance": ("triton", "compile", "reference"),
    "sample_scores": ("triton", "compile", "reference"),
    "accumulate_class_grads": ("ext", "reference"),
    "instance_norm_relu_pool": ("ext", "triton", "compile", "reference"),
}
METRICS = ("l1", "mse", "cos")


# =============================================================================== dispatch
def parse_spec(spec: str, source: str) -> dict[str, str]:
    """``auto``, a backend for every op, or ``op=backend,...`` -> ``{op or '*': backend}``;
    a ConfigError names ``source`` and the unknown op or backend."""
    spec = (spec or "auto").strip()
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        op, _, backend = part.rpartition("=")
        op = op.strip() or "*"
        backend = backend.strip()
        if backend not in BACKENDS + ("auto",):
            raise ConfigError(f"{source}: unknown backend {backend!r} (known: auto, "
                              f"{', '.join(BACKENDS)})")
        if op != "*" and op not in OPS:
            raise ConfigError(f"{source}: unknown op {op!r} (known: {', '.join(OPS)})")
        if op != "*" and backend != "auto" and backend not in IMPLEMENTED[op]:
            raise ConfigError(f"{source}: op {op} has no backend {backend!r} (it has: "
                              f"{', '.join(IMPLEMENTED[op])})")
        out[op] = backend
    return out


_forced: dict[str, str] | None = None  # set_backend() wins over the environment
_overrides: list[dict[str, str]] = []  # override() contexts win over both
_warned: set[str] = set()


def set_backend(spec: str | None) -> None:
    """Force backends for this process (``None`` or ``"auto"``: back to ``DASM_BACKEND``/auto)."""
    global _forced
    _forced = None if spec in (None, "auto") else parse_spec(spec, "config key 'backend'")


@contextlib.contextmanager
def override(**op_backends: str):
    """Temporarily run some ops on a given backend, e.g. ``instance_norm_relu_pool="reference"``
    where a caller knows the default one cannot serve (vmap, second-order norm matching)."""
    for op, b in op_backends.items():
        if op not in OPS or b not in BACKENDS:
            raise ValueError(f"override: unknown op or backend {op}={b}")
    _overrides.append(op_backends)
    try:
        yield
    finally:
        _overrides.pop()


@functools.lru_cache(maxsize=8)
def _env_spec(value: str) -> dict[str, str]:
    """``DASM_BACKEND`` parsed once per distinct value (the hot path reads only the variable)."""
    return parse_spec(value, "DASM_BACKEND")


def _preference(op: str) -> str:
    for table in reversed(_overrides):
        if op in table:
            return table[op]
    table = _forced if _forced is not None else _env_spec(os.environ.get("DASM_BACKEND", ""))
    return table.get(op, table.get("*", "auto"))


def _check_range(idx: torch.Tensor, n: int, what: str) -> None:
    """Indices on the host must lie in ``[0, n)``: a clear error here instead of a device
    assert (which kills the CUDA context) or an out-of-bounds read in a kernel. Indices already
    on a GPU are not checked (that would synchronise the hot path)."""
    if idx.device.type == "cpu" and len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what} outside [0, {n})")


def _float32_only(op: str, b: str, t: torch.Tensor) -> str:
    """The reference for a tensor the fast kernels do not take (they are float32 only); a
    backend forced for it is a clear error."""
    if b in ("reference", "compile") or t.dtype == torch.float32:
        return b
    if _preference(op) == b:
        raise BackendUnavailable(f"backend {b!r} was forced for {op} but takes float32 only "
                                 f"(got {t.dtype})")
    return "reference"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_error() -> str | None:
    """Why the triton backend cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or _interpret()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU interpreter)"
    return None


def _applicable(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``; else the reason."""
    if backend == "reference":
        return None
    if backend == "triton":
        err = triton_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and _interpret()):
            return None
        return f"triton runs on CUDA tensors (got {device.type})"
    if backend == "compile":
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        if device.type != "cuda":
            return f"compile is offered on CUDA tensors (got {device.type})"
        return None
    if backend == "ext":
        mod = ext()
        if mod is None:
            return ext_error()
        if device.type == "cpu":
            return None
        if device.type == "cuda" and op == "accumulate_class_grads" and mod.has_cuda():
            return None
        return f"the extension implements {op} on {'the CPU' if op != 'accumulate_class_grads' else 'CPU/CUDA'} only" \
            + (" (built without CUDA)" if device.type == "cuda" and not mod.has_cuda() else "")
    return f"unknown backend {backend}"


# ======================================================================= auto on CUDA
def _passes(*tensors: torch.Tensor) -> str:
    """``fwd+bwd`` when autograd will differentiate through the call, else ``fwd``."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return "fwd+bwd" if grad else "fwd"


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` (e.g. ``NVIDIA H200``), the auto table's row key."""
    return torch.cuda.get_device_name(device)


def measured_choice(op: str, shape: str | None, device: torch.device) -> str:
    """``auto``'s backend on CUDA: the fastest one :mod:`dasm.autotable` measured for ``op``
    and shape class ``shape`` on this device's name; a device or class without a row gets the
    table's default (``compile`` where it beat the reference on every device measured, else the
    reference). A choice that cannot run here falls back the same way."""
    from . import autotable

    key = f"{op}/{shape}" if shape else op
    row = autotable.TABLE.get(_device_name(device), {}).get("choice", {})
    for b in (row.get(key), autotable.DEFAULT.get(key)):
        if b is not None and b in IMPLEMENTED[op] and _applicable(op, b, device) is None:
            return b
    return "reference"


def backend_for(op: str, device: torch.device | str, shape: str | None = None) -> str:
    """The backend ``op`` runs on for tensors on ``device``; on CUDA ``auto`` looks up the
    shape class ``shape`` (see :func:`measured_choice`; the ops pass it)."""
    device = torch.device(device)
    pref = _preference(op)
    if pref == "auto" and device.type == "cuda":
        return measured_choice(op, shape, device)
    if pref == "auto":
        for b in IMPLEMENTED[op]:
            if (b == "triton" and device.type != "cuda") or b == "compile":
                continue  # the interpreter is for tests; compile is chosen by measurement
            reason = _applicable(op, b, device)
            if reason is None:
                return b
            if b == "ext" and device.type == "cpu" and "ext" not in _warned:
                _warned.add("ext")
                warnings.warn(f"dasm: using the reference backend for the extension's ops: "
                              f"{reason}", RuntimeWarning, stacklevel=3)
        return "reference"
    if pref not in IMPLEMENTED[op]:
        return "reference"
    reason = _applicable(op, pref, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {pref!r} was forced for {op} but cannot run: {reason}")
    return pref


def backend_table(device: torch.device | str) -> dict[str, str]:
    """op -> backend that would run on ``device`` (for logs and ``dasm info``); where ``auto``
    picks by shape class on CUDA, ``class=backend`` pairs."""
    device = torch.device(device)
    out = {}
    for op in OPS:
        if _preference(op) != "auto" or device.type != "cuda":
            out[op] = backend_for(op, device)
            continue
        from . import autotable

        keys = sorted({k for t in [autotable.DEFAULT] + [r["choice"] for r in
                                                          autotable.TABLE.values()]
                       for k in t if k.split("/")[0] == op})
        picks = {k.partition("/")[2]: measured_choice(op, k.partition("/")[2] or None, device)
                 for k in keys}
        out[op] = ", ".join(f"{k}={b}" if k else b for k, b in picks.items()) or \
            measured_choice(op, None, device)
    return out


def _kernel(name: str):
    return importlib.import_module(f"dasm.kernels.{name}")


_compiled_refs: dict[str, Callable] = {}


def _compiled(op: str) -> Callable:
    """``torch.compile`` of the reference of ``op`` (compiled once per process)."""
    if op not in _compiled_refs:
        _compiled_refs[op] = torch.compile(reference(op), dynamic=True)
    return _compiled_refs[op]


# ================================================================================ layout


def reference(op: str) -> Callable:
    """The reference implementation of ``op`` (for tests and benchmarks)."""
    return {"decode_augment": ref.decode_augment, "grad_distance": ref.grad_distance,
            "sample_scores": ref.sample_scores,
            "accumulate_class_grads": ref.accumulate_class_grads,
            "instance_norm_relu_pool": ref.instance_norm_relu_pool}[op]
