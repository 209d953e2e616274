"""The hot operations, one function each, dispatching by device and availability.

=========================  ==========================================================  =========
op                         what it computes                                            backends
=========================  ==========================================================  =========
decode_augment             stored images -> decoded, normalised, DSA-augmented batch   reference, triton, compile
grad_distance              flat per-class gradients -> per-class match distance        reference, triton, compile
sample_scores              logits, labels -> per-sample loss, EL2N, margin             reference, triton, compile
accumulate_class_grads     per-layer gradients -> rows of a flat ``[C, P]`` buffer      reference, ext
instance_norm_relu_pool    instance norm + ReLU (+ 2x2 average pool), twice            reference, ext (CPU),
                           differentiable                                              triton, compile*
=========================  ==========================================================  =========

``reference`` is pure PyTorch and the specification; ``triton`` kernels live in
:mod:`dasm.kernels` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``ext`` is the
compiled extension :mod:`dasm._C`; ``compile`` is ``torch.compile`` of the reference, on CUDA
(*torch.compile has no double backward, so the compiled block serves evaluation and scoring,
not matching). ``auto`` on the CPU picks the extension where built, else the reference; on
CUDA it picks by measurement, per device name and shape class (pass, metric, dtype), from
:mod:`dasm.autotable`, written by ``benchmarks/kernels.py`` (:func:`measured_choice`), so it
never runs a path its table shows slower. ``DASM_BACKEND`` (or
:func:`set_backend`, fed by the config key ``backend``) forces one: ``reference``, ``triton``,
``ext``, ``compile``, or per op, ``grad_distance=triton,decode_augment=reference``.
A forced backend that cannot run an op it implements is a :class:`BackendUnavailable` error, never a
silent fallback; a backend forced for one op that does not implement it is a ConfigError; a
backend forced for every op serves the ops it implements, the reference the others.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import _ext, dsa, fused_block
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
_second_order_depth = 0


@contextlib.contextmanager
def second_order():
    """Inside, the fused block's backward is differentiated again (gradient matching): ``auto``
    picks its backend among those measured with the double backward (never ``compile``)."""
    global _second_order_depth
    _second_order_depth += 1
    try:
        yield
    finally:
        _second_order_depth -= 1


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
@dataclass(frozen=True)
class GradLayout:
    """Where each matched parameter lives in a flat per-class gradient row ``[P]``.

    Parameter ``i`` of shape ``shapes[i]`` occupies ``[offsets[i], offsets[i] + numel_i)``; it is
    split into ``shapes[i][0]`` rows (output channels) of equal length for the ``cos`` metric.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def from_shapes(cls, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> "GradLayout":
        offsets, total = [], 0
        for s in shapes:
            offsets.append(total)
            total += math.prod(s)
        return cls(tuple(names), tuple(tuple(s) for s in shapes), tuple(offsets), total)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def row_starts(self, device=None) -> torch.Tensor:
        """``[R + 1]`` int64 offsets of the output-channel rows of all parameters."""
        starts = []
        for off, shape in zip(self.offsets, self.shapes):
            rows, n = shape[0], math.prod(shape)
            starts.extend(off + r * (n // rows) for r in range(rows))
        starts.append(self.numel)
        return torch.tensor(starts, dtype=torch.int64, device=device)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[C, P]`` -> per-parameter views ``[C, *shape]``."""
        return [flat[:, o:o + n].view(flat.shape[0], *s)
                for o, n, s in zip(self.offsets, self.sizes, self.shapes)]


# ============================================================================= public ops
def decode_augment(stored: torch.Tensor, factor: int = 1, sel: torch.Tensor | None = None,
                   params: dsa.DSAParams | None = None, mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None) -> torch.Tensor:
    """Decode, normalise and augment a batch.

    stored: ``[N, ch, H, W]`` float32 in [0, 1] (differentiable); factor: tiles per side;
    sel: ``[M]`` int64 decoded indices ``n * factor^2 + tile`` (None: all ``N * factor^2``);
    params: DSA rows for the ``M`` outputs, on any device (None: no augmentation); mean/std:
    ``[ch]`` (None: no normalisation). Returns ``[M, ch, H, W]`` float32.
    """
    if params is not None:
        M = stored.shape[0] * factor * factor if sel is None else sel.shape[0]
        if len(params) != M:
            raise ValueError(f"decode_augment: {len(params)} DSA rows for {M} outputs")
    if sel is not None:
        _check_range(sel, stored.shape[0] * factor * factor, "decode_augment: sel")
    b = _float32_only("decode_augment",
                      backend_for("decode_augment", stored.device, _passes(stored)), stored)
    if b == "triton":
        return _kernel("decode_augment").decode_augment(stored, factor, sel, params, mean, std)
    if b == "compile":
        return _compiled("decode_augment")(stored, factor, sel, params, mean, std)
    return ref.decode_augment(stored, factor, sel, params, mean, std)


def grad_distance(gr: torch.Tensor, gs: torch.Tensor, layout: GradLayout,
                  metric: str) -> torch.Tensor:
    """Per-class distance ``[C]`` between real ``gr`` and synthetic ``gs`` gradients ``[C, P]``.

    l1: sum |gr - gs|; mse: sum (gr - gs)^2; cos: sum over output-channel rows of
    1 - <gr, gs> / (|gr| |gs| + 1e-6). Differentiable with respect to ``gs`` (``gr`` is a target).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown match metric {metric!r} (known: {', '.join(METRICS)})")
    if gr.shape != gs.shape or gr.shape[1] != layout.numel:
        raise ValueError(f"grad_distance: shapes {tuple(gr.shape)}, {tuple(gs.shape)} do not fit "
                         f"a layout of {layout.numel} values")
    b = _float32_only("grad_distance",
                      backend_for("grad_distance", gs.device, f"{metric}/{_passes(gs)}"), gs)
    if b == "triton":
        return _kernel("grad_distance").grad_distance(gr, gs, layout, metric)
    if b == "compile":
        return _compiled("grad_distance")(gr.detach(), gs, layout, metric)
    return ref.grad_distance(gr.detach(), gs, layout, metric)


def sample_scores(logits: torch.Tensor, labels: torch.Tensor):
    """Per-sample cross-entropy loss, EL2N (|softmax - onehot|_2) and margin (true logit minus
    the largest other) of ``logits [N, K]`` (fp32/bf16/fp16) -> three ``[N]`` float32 tensors."""
    _check_range(labels, logits.shape[1], "sample_scores: labels")
    b = backend_for("sample_scores", logits.device, str(logits.dtype).removeprefix("torch."))
    if b == "triton" and logits.dtype == torch.float64:
        b = _float32_only("sample_scores", b, logits)
    if b == "triton":
        return _kernel("sample_scores").sample_scores(logits, labels)
    if b == "compile":
        return _compiled("sample_scores")(logits, labels)
    return ref.sample_scores(logits, labels)


def accumulate_class_grads(buffer: torch.Tensor, grads: Sequence[torch.Tensor],
                           offsets: Sequence[int], classes: torch.Tensor,
                           scale: float = 1.0) -> torch.Tensor:
    """``buffer[classes[j], offsets[i]:offsets[i] + numel_i] += scale * grads[i][j].flatten()``.

    buffer: ``[C, P]`` float32, updated in place; grads: per-layer ``[B, *shape_i]``; classes:
    ``[B]`` int64 rows (repeats accumulate). Host rows are range-checked and cost no
    synchronisation (the matcher's); rows on a GPU are not checked, and the extension copies
    them to the host first, a synchronisation. Returns ``buffer``. No autograd.
    """
    if len(grads) != len(offsets):
        raise ValueError("accumulate_class_grads: one offset per gradient tensor")
    spans = sorted((int(o), int(o) + g[0].numel() if len(g) else int(o))
                   for o, g in zip(offsets, grads))
    if any(lo < 0 for lo, _ in spans) or spans and spans[-1][1] > buffer.shape[1] or any(
            a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"accumulate_class_grads: layer spans {spans} overlap or leave the "
                         f"buffer's {buffer.shape[1]} columns")
    _check_range(classes, buffer.shape[0], "accumulate_class_grads: classes")
    b = _float32_only("accumulate_class_grads",
                      backend_for("accumulate_class_grads", buffer.device), buffer)
    with torch.no_grad():
        if b == "ext":
            if classes.device.type != "cpu":  # the kernel reads host rows: a synchronisation
                classes = classes.cpu()
            classes = classes.contiguous()
            ext().accumulate_class_grads(buffer, list(grads), [int(o) for o in offsets], classes,
                                         float(scale))
            return buffer
        return ref.accumulate_class_grads(buffer, grads, offsets, classes.to(buffer.device),
                                          scale)


def instance_norm_relu_pool(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            pool: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """ConvNet block tail: instance norm (GroupNorm with a group per channel, affine), ReLU and,
    if ``pool``, 2x2 average pooling. ``z [N, C, H, W]`` -> ``[N, C, H', W']``. Differentiable
    twice with respect to ``z`` (gradient matching backpropagates through its backward)."""
    shape = "fwd+bwd+2bwd" if _second_order_depth else _passes(z, weight, bias)
    b = _float32_only("instance_norm_relu_pool",
                      backend_for("instance_norm_relu_pool", z.device, shape), z)
    limit = _kernel("instance_norm_relu_pool").MAX_PLANE if b == "triton" else None
    if limit is not None and z.shape[-2] * z.shape[-1] > limit:
        if _preference("instance_norm_relu_pool") == "triton":
            raise BackendUnavailable(f"backend 'triton' was forced for instance_norm_relu_pool "
                                     f"but planes of {z.shape[-2]}x{z.shape[-1]} exceed "
                                     f"{limit} values")
        b = "reference"
    if b == "ext":
        return fused_block.instance_norm_relu_pool(z, weight, bias, pool, eps, _ext.BlockKernels)
    if b == "triton":
        return fused_block.instance_norm_relu_pool(z, weight, bias, pool, eps,
                                                   _kernel("instance_norm_relu_pool"))
    if b == "compile":
        return _compiled("instance_norm_relu_pool")(z, weight, bias, pool, eps)
    return ref.instance_norm_relu_pool(z, weight, bias, pool, eps)


def reference(op: str) -> Callable:
    """The reference implementation of ``op`` (for tests and benchmarks)."""
    return {"decode_augment": ref.decode_augment, "grad_distance": ref.grad_distance,
            "sample_scores": ref.sample_scores,
            "accumulate_class_grads": ref.accumulate_class_grads,
            "instance_norm_relu_pool": ref.instance_norm_relu_pool}[op]
