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
compiled extension :mod:`dasm._C`; ``compile`` is ``torch.compile`` of the reference, on CUDA,
never chosen by ``auto`` (force it per op where the GPU benchmark shows it ahead; *torch.compile
has no double backward, so the compiled block serves evaluation and scoring, not matching).
``auto`` picks the fastest backend that is available and applicable. ``DASM_BACKEND`` (or
:func:`set_backend`, fed by the config key ``backend``) forces one: ``reference``, ``triton``,
``ext``, ``compile``, or per op, ``grad_distance=triton,decode_augment=reference``.
A forced backend that cannot run an op it implements is a :class:`BackendUnavailable` error, never a
silent fallback; ops that a forced backend does not implement use the reference.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _ext, dsa, fused_block
from ._ext import ext, ext_error
from .data import normalize
from .formation import tile_shape
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
COS_EPS = 1e-6


# =============================================================================== dispatch
def _parse_spec(spec: str, source: str) -> dict[str, str]:
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
        out[op] = backend
    return out


_forced: dict[str, str] | None = None  # set_backend() wins over the environment
_overrides: list[dict[str, str]] = []  # override() contexts win over both
_warned: set[str] = set()


def set_backend(spec: str | None) -> None:
    """Force backends for this process (``None`` or ``"auto"``: back to ``DASM_BACKEND``/auto)."""
    global _forced
    _forced = None if spec in (None, "auto") else _parse_spec(spec, "config key 'backend'")


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


def _preference(op: str) -> str:
    for table in reversed(_overrides):
        if op in table:
            return table[op]
    table = _forced if _forced is not None else _parse_spec(os.environ.get("DASM_BACKEND", ""),
                                                            "DASM_BACKEND")
    return table.get(op, table.get("*", "auto"))


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


def backend_for(op: str, device: torch.device | str) -> str:
    """The backend ``op`` runs on for tensors on ``device``."""
    device = torch.device(device)
    pref = _preference(op)
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
    """op -> backend that would run on ``device`` (for logs and ``dasm info``)."""
    return {op: backend_for(op, device) for op in OPS}


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


# =========================================================================== reference
def _decode_reference(stored: torch.Tensor, factor: int, sel: torch.Tensor | None) -> torch.Tensor:
    """IDC's decode: pad to a multiple of ``factor`` with 0.5, split into ``factor^2`` tiles
    (row-major) of size ceil(H/f) x ceil(W/f), upsample each bilinearly (align_corners=False)."""
    N, ch, H, W = stored.shape
    if factor == 1:
        return stored if sel is None else stored[sel]
    th, tw = tile_shape((H, W), factor)
    x = stored
    if th * factor != H or tw * factor != W:
        x = F.pad(x, (0, tw * factor - W, 0, th * factor - H), value=0.5)
    tiles = x.view(N, ch, factor, th, factor, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(N * factor * factor, ch, th, tw)
    if sel is not None:
        tiles = tiles[sel]
    return F.interpolate(tiles, size=(H, W), mode="bilinear", align_corners=False)


def _decode_augment_reference(stored, factor, sel, params, mean, std):
    x = _decode_reference(stored, factor, sel)
    if mean is not None:
        x = normalize(x, mean, std)
    if params is not None and params.strategy.enabled:
        x = dsa.apply_reference(x, params.to(x.device))
    return x


def _grad_distance_reference(gr, gs, layout: GradLayout, metric: str):
    if metric == "l1":
        return (gr - gs).abs().sum(dim=1)
    if metric == "mse":
        return (gr - gs).pow(2).sum(dim=1)
    total = gr.new_zeros(gr.shape[0])
    for x, y in zip(layout.split(gr), layout.split(gs)):
        x, y = x.flatten(2), y.flatten(2)  # [C, rows, len]
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + COS_EPS)
        total = total + (1 - cos).sum(dim=1)
    return total


def _sample_scores_reference(logits, labels):
    lf = logits.float()
    logp = torch.log_softmax(lf, dim=1)
    loss = -logp.gather(1, labels[:, None]).squeeze(1)
    onehot = F.one_hot(labels, lf.shape[1]).to(lf.dtype)
    el2n = (logp.exp() - onehot).norm(dim=1)
    true = lf.gather(1, labels[:, None]).squeeze(1)
    other = lf.masked_fill(onehot.bool(), float("-inf")).max(dim=1).values
    return loss, el2n, true - other


def _accumulate_reference(buffer, grads, offsets, classes, scale):
    for g, off in zip(grads, offsets):
        n = g[0].numel()
        buffer[:, off:off + n].index_add_(0, classes, g.reshape(g.shape[0], n).to(buffer.dtype),
                                          alpha=scale)
    return buffer


def _inrp_reference(z, weight, bias, pool, eps):
    y = F.relu(F.group_norm(z, z.shape[1], weight, bias, eps))
    return F.avg_pool2d(y, 2) if pool else y


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
    b = backend_for("decode_augment", stored.device)
    if b == "triton":
        return _kernel("decode_augment").decode_augment(stored, factor, sel, params, mean, std)
    if b == "compile":
        return _compiled("decode_augment")(stored, factor, sel, params, mean, std)
    return _decode_augment_reference(stored, factor, sel, params, mean, std)


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
    b = backend_for("grad_distance", gs.device)
    if b == "triton":
        return _kernel("grad_distance").grad_distance(gr, gs, layout, metric)
    if b == "compile":
        return _compiled("grad_distance")(gr.detach(), gs, layout, metric)
    return _grad_distance_reference(gr.detach(), gs, layout, metric)


def sample_scores(logits: torch.Tensor, labels: torch.Tensor):
    """Per-sample cross-entropy loss, EL2N (|softmax - onehot|_2) and margin (true logit minus
    the largest other) of ``logits [N, K]`` (fp32/bf16/fp16) -> three ``[N]`` float32 tensors."""
    b = backend_for("sample_scores", logits.device)
    if b == "triton":
        return _kernel("sample_scores").sample_scores(logits, labels)
    if b == "compile":
        return _compiled("sample_scores")(logits, labels)
    return _sample_scores_reference(logits, labels)


def accumulate_class_grads(buffer: torch.Tensor, grads: Sequence[torch.Tensor],
                           offsets: Sequence[int], classes: torch.Tensor,
                           scale: float = 1.0) -> torch.Tensor:
    """``buffer[classes[j], offsets[i]:offsets[i] + numel_i] += scale * grads[i][j].flatten()``.

    buffer: ``[C, P]`` float32, updated in place; grads: per-layer ``[B, *shape_i]``; classes:
    ``[B]`` int64 rows (repeats accumulate). Returns ``buffer``. No autograd.
    """
    if len(grads) != len(offsets):
        raise ValueError("accumulate_class_grads: one offset per gradient tensor")
    b = backend_for("accumulate_class_grads", buffer.device)
    with torch.no_grad():
        if b == "ext":
            ext().accumulate_class_grads(buffer, list(grads), [int(o) for o in offsets], classes,
                                         float(scale))
            return buffer
        return _accumulate_reference(buffer, grads, offsets, classes, scale)


def instance_norm_relu_pool(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            pool: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """ConvNet block tail: instance norm (GroupNorm with a group per channel, affine), ReLU and,
    if ``pool``, 2x2 average pooling. ``z [N, C, H, W]`` -> ``[N, C, H', W']``. Differentiable
    twice with respect to ``z`` (gradient matching backpropagates through its backward)."""
    b = backend_for("instance_norm_relu_pool", z.device)
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
    return _inrp_reference(z, weight, bias, pool, eps)


def reference(op: str) -> Callable:
    """The reference implementation of ``op`` (for tests and benchmarks)."""
    return {"decode_augment": _decode_augment_reference, "grad_distance": _grad_distance_reference,
            "sample_scores": _sample_scores_reference,
            "accumulate_class_grads": _accumulate_reference,
            "instance_norm_relu_pool": _inrp_reference}[op]
