"""Memory safety of every kernel, found without a GPU.

Triton kernels run on the CPU interpreter with a bounds checker: every load and store of a
launch (masked lanes excepted) must fall, all its lanes together, inside one of the tensors
passed to that launch, so an overrun that lands in a neighbouring argument fails too. The interpreter itself does not check: an unmasked read past a buffer returns whatever
lies there, and the same read on a GPU is an illegal memory access that kills the CUDA context.
Inputs also sit inside larger buffers whose guard regions hold NaN (a canary), so a read of the
guard by the extension's C++ kernels shows in their results, and a write into it shows in the
guard. Shapes are odd on purpose: 1 and 3 channels, odd planes, one element past a block.
"""
import contextlib
import os

import numpy as np
import pytest
import torch

from dasm import dsa, ops
from dasm.dsa import Strategy

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------- harness
@contextlib.contextmanager
def bounds_checked():
    """Patch Triton's interpreter so that every access outside the launch's tensor arguments
    is recorded; yields the list of violations."""
    from triton.runtime import interpreter as ti

    ranges: list[tuple[int, int]] = []  # [start, end) bytes of this launch's tensor arguments
    violations: list[str] = []
    kernel = [""]
    orig_cvt, orig_call = ti._implicit_cvt, ti.GridExecutor.__call__
    orig_load = ti.InterpreterBuilder.create_masked_load
    orig_store = ti.InterpreterBuilder.create_masked_store

    def cvt(arg):
        if isinstance(arg, torch.Tensor) and arg.numel():
            span = sum((s - 1) * st for s, st in zip(arg.shape, arg.stride())) + 1
            ranges.append((arg.data_ptr(), arg.data_ptr() + span * arg.element_size()))
        return orig_cvt(arg)

    def call(self, *a, **kw):
        ranges.clear()
        kernel[0] = getattr(self.fn, "__name__", "?")
        return orig_call(self, *a, **kw)

    def check(kind, ptrs, mask):
        size = ti._get_np_dtype(ptrs.get_element_ty()).itemsize
        addr = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        inside = [(addr >= start) & (addr + size <= end) for start, end in ranges]
        if any(lanes.all() for lanes in inside):
            return  # every lane in one tensor: the access is attributed to it
        ok = np.logical_or.reduce(inside) if inside else np.zeros(addr.shape, dtype=bool)
        if not ok.all():
            violations.append(f"{kernel[0]}: {kind} of {int((~ok).sum())} lane(s) outside "
                              f"every argument")
        else:  # an overrun of one tensor that lands in a neighbouring argument
            violations.append(f"{kernel[0]}: {kind} spans {sum(bool(m.any()) for m in inside)} "
                              f"arguments")

    def load(self, ptrs, mask, other, *a):
        check("load", ptrs, mask)
        return orig_load(self, ptrs, mask, other, *a)

    def store(self, ptrs, value, mask, *a):
        check("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, *a)

    ti._implicit_cvt, ti.GridExecutor.__call__ = cvt, call
    ti.InterpreterBuilder.create_masked_load = load
    ti.InterpreterBuilder.create_masked_store = store
    try:
        yield violations
    finally:
        ti._implicit_cvt, ti.GridExecutor.__call__ = orig_cvt, orig_call
        ti.InterpreterBuilder.create_masked_load = orig_load
        ti.InterpreterBuilder.create_masked_store = orig_store


def guarded(t: torch.Tensor, pad: int = 64, canary: float = float("nan")) -> torch.Tensor:
    """``t`` as a contiguous view inside a larger buffer whose guard regions hold ``canary``."""
    flat = torch.full((pad + t.numel() + pad,), canary, dtype=t.dtype)
    flat[pad:pad + t.numel()] = t.reshape(-1)
    return flat[pad:pad + t.numel()].view(t.shape)


def guard_intact(view: torch.Tensor, pad: int = 64) -> bool:
    """Whether the guard regions around a view made by :func:`guarded` still hold NaN."""
    base = view.untyped_storage()
    flat = torch.empty(0, dtype=view.dtype).set_(base, 0, (base.nbytes() // view.element_size(),))
    return bool(torch.isnan(flat[:pad]).all() and torch.isnan(flat[pad + view.numel():]).all())


def both(fn, ref, *args, grad_of=(), seed=0):
    """Outputs of ``fn`` and ``ref`` and the gradients of a random projection with respect to
    the arguments at positions ``grad_of``."""
    out = []
    for f in (fn, ref):
        a = [x.detach().clone().requires_grad_() if i in grad_of else x
             for i, x in enumerate(args)]
        y = f(*a)
        ys = y if isinstance(y, tuple) else (y,)
        g = torch.Generator().manual_seed(seed)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in ys
                   if t.dtype.is_floating_point)
        grads = torch.autograd.grad(loss, [a[i] for i in grad_of]) if grad_of else ()
        out.append(([t.detach() for t in ys], list(grads)))
    return out


def assert_same(got, want, rtol=1e-4, atol=1e-5):
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the bounds checker patches "
                                       "Triton's CPU interpreter (TRITON_INTERPRET=1)")


# ------------------------------------------------------------------------ Triton kernels
@needs_interpreter
def test_the_checker_attributes_each_access_to_one_tensor():
    """A load that runs 2 elements past its tensor into the next argument (two views of one
    buffer, as a caching allocator can place them) is a violation, though every lane it reads
    lies inside some argument of the launch; the same copy without the overrun is not."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x, y, out, n, over, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out + offs, tl.load(x + offs, mask=offs < n + over), mask=offs < n)
        tl.store(y + offs, tl.load(y + offs, mask=offs < n), mask=offs < n)

    buf = torch.arange(16, dtype=torch.float32)
    x, y, out = buf[:8], buf[8:], torch.empty(8)
    with bounds_checked() as violations:
        copy[(1,)](x, y, out, 8, 0, BLOCK=16)
    assert violations == []
    with bounds_checked() as violations:
        copy[(1,)](x, y, out, 8, 2, BLOCK=16)
    assert violations == ["copy: load spans 2 arguments"], violations


@needs_interpreter
@pytest.mark.parametrize("ch, size, factor, strategy", [
    (3, (5, 7), 2, "color_crop_cutout_flip_scale_rotate"),  # the padded channel of colour data
    (1, (17, 16), 1, "color_crop_cutout"),  # H*W one block and 16 past it
    (3, (9, 9), 3, "none"),
    (1, (7, 9), 2, "flip_scale_rotate"),
])
def test_decode_augment_stays_in_bounds(ch, size, factor, strategy):
    from dasm.kernels import decode_augment as k

    g = torch.Generator().manual_seed(ch + factor)
    N = 2
    stored = guarded(torch.rand(N, ch, *size, generator=g))
    sel = guarded(torch.tensor([N * factor * factor - 1, 0, 1][: min(3, N * factor * factor)]),
                  canary=0)
    params = dsa.draw(Strategy.parse(strategy), sel.shape[0], size, g)
    mean, std = guarded(torch.rand(ch) * 0.5), guarded(torch.rand(ch) * 0.5 + 0.2)
    with bounds_checked() as violations:
        got, want = both(lambda x: k.decode_augment(x, factor, sel, params, mean, std),
                         lambda x: ops.reference("decode_augment")(x, factor, sel, params, mean,
                                                                   std), stored, grad_of=(0,))
    assert not violations, violations
    assert_same(got, want)


@needs_interpreter
@pytest.mark.parametrize("metric", ["l1", "mse", "cos"])
def test_grad_distance_stays_in_bounds(metric):
    from dasm.kernels import grad_distance as k

    layout = ops.GradLayout.from_shapes(["a", "b"], [(3, 1, 3, 3), (5, 3, 3, 3)])  # 27 + 135
    g = torch.Generator().manual_seed(1)
    gr = guarded(torch.randn(3, layout.numel, generator=g))
    gs = guarded(torch.randn(3, layout.numel, generator=g))
    with bounds_checked() as violations:
        got, want = both(lambda s: k.grad_distance(gr, s, layout, metric),
                         lambda s: ops.reference("grad_distance")(gr, s, layout, metric), gs,
                         grad_of=(0,))
    assert not violations, violations
    assert_same(got, want)


@needs_interpreter
@pytest.mark.parametrize("N, K", [(3, 7), (2, 1025)])
def test_sample_scores_stays_in_bounds(N, K):
    from dasm.kernels import sample_scores as k

    g = torch.Generator().manual_seed(K)
    logits = guarded(torch.randn(N, K, generator=g))
    labels = guarded(torch.randint(0, K, (N,), generator=g), canary=0)
    with bounds_checked() as violations:
        got, want = both(lambda z: k.sample_scores(z, labels),
                         lambda z: ops.reference("sample_scores")(z, labels), logits)
    assert not violations, violations
    assert_same(got, want)


def block_case(ch=3, size=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (guarded(torch.randn(2, ch, *size, generator=g)), guarded(torch.randn(ch, generator=g)),
            guarded(torch.randn(ch, generator=g) * 0.5))


def block_derivatives(fn, z, w, b, pool):
    """Forward, first and second derivatives of the ConvNet block tail."""
    z, w, b = (t.detach().clone().requires_grad_() for t in (z, w, b))
    out = fn(z, w, b, pool, 1e-5)
    g = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=g).requires_grad_()
    gz, gw, gb = torch.autograd.grad(out, (z, w, b), go, create_graph=True)
    second = torch.autograd.grad((gz * torch.randn(gz.shape, generator=g)).sum(), (z, go, w))
    return [out.detach(), gz.detach(), gw.detach(), gb.detach(), *second]


@needs_interpreter
@pytest.mark.parametrize("pool", [0, 1])
def test_triton_block_stays_in_bounds(pool):
    from dasm import fused_block
    from dasm.kernels import instance_norm_relu_pool as kernels

    def triton_block(z, w, b, pool, eps):
        return fused_block.instance_norm_relu_pool(z, w, b, pool, eps, kernels)

    z, w, b = block_case()
    with bounds_checked() as violations:
        got = block_derivatives(triton_block, z, w, b, pool)
    assert not violations, violations
    want = block_derivatives(ops.reference("instance_norm_relu_pool"), z, w, b, pool)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- the C++ extension
ext_only = pytest.mark.skipif(ops.backend_for("accumulate_class_grads", "cpu") != "ext",
                              reason="the extension is not built")


@ext_only
def test_accumulate_class_grads_writes_only_its_rows():
    C, P = 4, 27 + 135
    offsets = ops.GradLayout.from_shapes(["a", "b"], [(3, 1, 3, 3), (5, 3, 3, 3)]).offsets
    g = torch.Generator().manual_seed(2)
    grads = [guarded(torch.randn(2, 3, 1, 3, 3, generator=g)),
             guarded(torch.randn(2, 5, 3, 3, 3, generator=g))]
    classes = torch.tensor([3, 0])
    got = guarded(torch.zeros(C, P))
    with ops.override(accumulate_class_grads="ext"):
        ops.accumulate_class_grads(got, grads, offsets, classes, 0.5)
    want = torch.zeros(C, P)
    ops.reference("accumulate_class_grads")(want, grads, offsets, classes, 0.5)
    assert guard_intact(got)
    torch.testing.assert_close(got, want)


@ext_only
@pytest.mark.parametrize("pool", [0, 1])
@pytest.mark.parametrize("ch, size", [(1, (5, 7)), (3, (9, 8))])
def test_extension_block_reads_only_its_inputs(pool, ch, size):
    from dasm import _ext, fused_block

    def ext_block(z, w, b, pool, eps):
        return fused_block.instance_norm_relu_pool(z, w, b, pool, eps, _ext.BlockKernels)

    z, w, b = block_case(ch, size)
    got = block_derivatives(ext_block, z, w, b, pool)
    want = block_derivatives(ops.reference("instance_norm_relu_pool"), z, w, b, pool)
    for a, r in zip(got, want):  # a read of the NaN guard would show here
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
