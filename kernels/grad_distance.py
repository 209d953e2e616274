"""Per-class distance between flat real and synthetic gradients ``[C, P]`` (Triton).

l1 / mse: one program per (chunk of the row, class) writes a partial sum; cos: one program per
(output-channel row of the layout, class) writes the row's dot and norms. Either way the partials
are summed per class by one reduction: two launches forward, one backward. The backward is with
respect to the synthetic gradients (the real ones are a target).

The chunks (or rows) go on grid axis 0, which takes up to 2^31 - 1 programs, and the classes on
axis 1 (at most 65,535): a matching network of any size launches (:func:`launch_grid`).
"""
from functools import lru_cache

import torch
import triton
import triton.language as tl

L1, MSE, COS = 0, 1, 2
METRIC = {"l1": L1, "mse": MSE, "cos": COS}
COS_EPS = 1e-6
BLOCK = 1024
MAX_AXIS0, MAX_AXIS1 = 2 ** 31 - 1, 65535  # CUDA's grid limits


def launch_grid(C: int, work: int) -> tuple[int, int]:
    """The grid of ``work`` chunks or rows per class for ``C`` classes; a clear error where
    CUDA could not launch it."""
    if C > MAX_AXIS1 or work > MAX_AXIS0:
        raise ValueError(f"grad_distance (triton): {C} classes x {work} chunks exceed the launch "
                         f"grid ({MAX_AXIS1} classes, {MAX_AXIS0} chunks); use the reference")
    return work, C


@triton.jit
def _elem_chunk(gr_ptr, gs_ptr, P, BLOCK: tl.constexpr):
    """Program (j, c)'s chunk j of class c: flat offsets into [C, P], their mask, and gs - gr."""
    within = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = within < P
    offs = tl.program_id(1).to(tl.int64) * P + within
    d = tl.load(gs_ptr + offs, mask=mask, other=0.0) - tl.load(gr_ptr + offs, mask=mask, other=0.0)
    return offs, mask, d


@triton.jit
def _elem_fwd(gr_ptr, gs_ptr, part_ptr, P, n_chunks, METRIC: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, d = _elem_chunk(gr_ptr, gs_ptr, P, BLOCK)
    v = tl.abs(d) if METRIC == 0 else d * d
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * n_chunks + tl.program_id(0),
             tl.sum(v, axis=0))


@triton.jit
def _elem_bwd(gr_ptr, gs_ptr, gout_ptr, grad_ptr, P, METRIC: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, d = _elem_chunk(gr_ptr, gs_ptr, P, BLOCK)
    c = tl.program_id(1)
    g = tl.load(gout_ptr + c)
    if METRIC == 0:
        v = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        v = 2.0 * d
    tl.store(grad_ptr + offs, v * g, mask=mask)


@triton.jit
def _cos_fwd(gr_ptr, gs_ptr, starts_ptr, stats_ptr, P, R, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1)
    lo = tl.load(starts_ptr + r)
    hi = tl.load(starts_ptr + r + 1)
    base = c.to(tl.int64) * P
    acc_d = tl.zeros([BLOCK], tl.float32)
    acc_x = tl.zeros([BLOCK], tl.float32)
    acc_y = tl.zeros([BLOCK], tl.float32)
    for k in range(lo, hi, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < hi
        x = tl.load(gr_ptr + base + offs, mask=mask, other=0.0)
        y = tl.load(gs_ptr + base + offs, mask=mask, other=0.0)
        acc_d += x * y
        acc_x += x * x
        acc_y += y * y
    out = stats_ptr + (c.to(tl.int64) * R + r) * 3
    tl.store(out, tl.sum(acc_d, axis=0))
    tl.store(out + 1, tl.sqrt(tl.sum(acc_x, axis=0)))
    tl.store(out + 2, tl.sqrt(tl.sum(acc_y, axis=0)))


@triton.jit
def _cos_bwd(gr_ptr, gs_ptr, starts_ptr, stats_ptr, gout_ptr, grad_ptr, P, R, eps,
             BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1)
    lo = tl.load(starts_ptr + r)
    hi = tl.load(starts_ptr + r + 1)
    base = c.to(tl.int64) * P
    st = stats_ptr + (c.to(tl.int64) * R + r) * 3
    dot = tl.load(st)
    nx = tl.load(st + 1)
    ny = tl.load(st + 2)
    g = tl.load(gout_ptr + c)
    n = nx * ny + eps
    # d/dy [1 - dot / (|x||y| + eps)] = -x / n + dot |x| (y / |y|) / n^2   (y/|y| := 0 at |y| = 0)
    a = -g / n
    b = tl.where(ny > 0, g * dot * nx / (n * n * tl.where(ny > 0, ny, 1.0)), 0.0)
    for k in range(lo, hi, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        mask = offs < hi
        x = tl.load(gr_ptr + base + offs, mask=mask, other=0.0)
        y = tl.load(gs_ptr + base + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + base + offs, a * x + b * y, mask=mask)


@lru_cache(maxsize=64)
def _row_starts(layout, device: str) -> torch.Tensor:
    return layout.row_starts(device)


class _GradDistance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gr, gs, layout, metric):
        gr, gs = gr.detach().float().contiguous(), gs.detach().float().contiguous()
        C, P = gs.shape
        code = METRIC[metric]
        ctx.metric, ctx.layout = code, layout
        if code == COS:
            starts = _row_starts(layout, str(gs.device))
            R = starts.numel() - 1
            stats = torch.empty(C, R, 3, device=gs.device, dtype=torch.float32)
            _cos_fwd[launch_grid(C, R)](gr, gs, starts, stats, P, R, BLOCK=BLOCK)
            ctx.save_for_backward(gr, gs, stats)
            return (1 - stats[..., 0] / (stats[..., 1] * stats[..., 2] + COS_EPS)).sum(1)
        n_chunks = triton.cdiv(P, BLOCK)
        part = torch.empty(C, n_chunks, device=gs.device, dtype=torch.float32)
        _elem_fwd[launch_grid(C, n_chunks)](gr, gs, part, P, n_chunks, METRIC=code, BLOCK=BLOCK)
        ctx.save_for_backward(gr, gs)
        return part.sum(1)

    @staticmethod
    def backward(ctx, gout):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        gout = gout.float().contiguous()
        if ctx.metric == COS:
            gr, gs, stats = ctx.saved_tensors
            C, P = gs.shape
            starts = _row_starts(ctx.layout, str(gs.device))
            grad = torch.empty_like(gs)
            _cos_bwd[launch_grid(C, starts.numel() - 1)](gr, gs, starts, stats, gout, grad, P,
                                               starts.numel() - 1, COS_EPS, BLOCK=BLOCK)
        else:
            gr, gs = ctx.saved_tensors
            C, P = gs.shape
            grad = torch.empty_like(gs)
            _elem_bwd[launch_grid(C, triton.cdiv(P, BLOCK))](gr, gs, gout, grad, P,
                                                             METRIC=ctx.metric, BLOCK=BLOCK)
        return None, grad, None, None


def grad_distance(gr: torch.Tensor, gs: torch.Tensor, layout, metric: str) -> torch.Tensor:
    """``[C]`` distances of ``gr``, ``gs`` ``[C, P]`` (see :func:`dasm.ops.grad_distance`)."""
    return _GradDistance.apply(gr, gs, layout, metric)
