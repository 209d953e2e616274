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
backend forced for every op serves the ops it implements, the reference the others. That choice
lives in :mod:`dasm.dispatch`; this module holds the ops.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import _ext, dsa, fused_block
from ._ext import ext, ext_error  # noqa: F401 (re-exported: the extension and why it is absent)
from . import reference as ref
from .errors import BackendUnavailable, ConfigError

from .dispatch import (BACKENDS, IMPLEMENTED, METRICS, OPS, _check_range,  # noqa: F401
                       _compiled, _float32_only, _kernel, _passes, _preference, backend_for,
                       backend_table, measured_choice, override, parse_spec, reference,
                       set_backend, triton_error)

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
