"""Triton kernels against the reference backend, forward and backward, on fresh random inputs.

Without a GPU they run on Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest.py)
on small grids; with one (``-m cuda``) on the device, larger.
"""
import importlib.util
import os
from dataclasses import replace

import pytest
import torch

from dasm import dsa, ops
from dasm.dsa import Strategy

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

from dasm.kernels import decode_augment as k_decode  # noqa: E402
from dasm.kernels import grad_distance as k_dist  # noqa: E402
from dasm.kernels import instance_norm_relu_pool as k_block  # noqa: E402
from dasm.kernels import sample_scores as k_scores  # noqa: E402

from conftest import assert_block_matches_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ALL = "color_crop_cutout_flip_scale_rotate"


def close(a, b, **kw):
    torch.testing.assert_close(a.cpu(), b.cpu(), **kw)


# ------------------------------------------------------------------------- sample_scores
@pytest.mark.parametrize("N, K", [(5, 10), (37, 3), (9, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sample_scores(N, K, dtype):
    g = torch.Generator().manual_seed(N * K)
    logits = (torch.randn(N, K, generator=g) * 3).to(dtype).to(DEV)
    labels = torch.randint(0, K, (N,), generator=g).to(DEV)
    got = k_scores.sample_scores(logits, labels)
    want = ops.reference("sample_scores")(logits, labels)
    for a, b in zip(got, want):
        close(a, b, rtol=1e-4, atol=1e-4)


def test_sample_scores_strided_and_large_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2100, generator=g).to(DEV)[:, ::2]  # K = 1050 > one tile
    labels = torch.randint(0, 1050, (6,), generator=g).to(DEV)
    for a, b in zip(k_scores.sample_scores(logits, labels),
                    ops.reference("sample_scores")(logits, labels)):
        close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- grad_distance
LAYOUT = ops.GradLayout.from_shapes(["a", "b", "c"], [(3, 1, 3, 3), (4, 3, 3, 3), (2, 4)])


@pytest.mark.parametrize("metric", ["l1", "mse", "cos"])
def test_grad_distance_forward_backward(metric):
    g = torch.Generator().manual_seed(1)
    C, P = 3, LAYOUT.numel
    gr = torch.randn(C, P, generator=g).to(DEV)
    gs0 = torch.randn(C, P, generator=g).to(DEV)
    gs0[1, :27] = 0.0  # a zero row for cos (|y| = 0)
    w = torch.randn(C, generator=g).to(DEV)
    outs = []
    for fn in (ops.reference("grad_distance"), k_dist.grad_distance):
        gs = gs0.clone().requires_grad_()
        d = fn(gr, gs, LAYOUT, metric)
        (grad,) = torch.autograd.grad((d * w).sum(), gs)
        outs.append((d.detach(), grad))
    close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ decode_augment
def run_both(stored, factor, sel, params, mean, std, seed=3):
    outs = []
    for fn in (ops.reference("decode_augment"), k_decode.decode_augment):
        x = stored.clone().requires_grad_()
        y = fn(x, factor, sel, params, mean, std)
        gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
        (gx,) = torch.autograd.grad((y * gout).sum(), x)
        outs.append((y.detach(), gx))
    return outs


CASES = [  # (channels, size, factor, strategy, shared_geometric)
    (1, (8, 8), 2, ALL, False),
    (3, (8, 8), 1, ALL, False),
    (1, (7, 9), 2, "color_crop_cutout", False),
    (3, (9, 9), 3, "flip_rotate", False),
    (1, (28, 28), 2, "color_crop_cutout", True),
    (3, (6, 6), 2, "none", False),
]


@pytest.mark.parametrize("ch, size, factor, strategy, shared", CASES)
def test_decode_augment_matches_reference(ch, size, factor, strategy, shared):
    g = torch.Generator().manual_seed(sum(size) + factor)
    N = 3
    stored = torch.rand(N, ch, *size, generator=g).to(DEV)
    M = 4 if size[0] > 16 else 6
    sel = torch.randint(0, N * factor * factor, (M,), generator=g)
    sel[1] = sel[0]  # a repeated tile accumulates
    params = dsa.draw(Strategy.parse(strategy), M, size, g, shared_geometric=shared)
    mean = torch.rand(ch, generator=g).to(DEV)
    std = (torch.rand(ch, generator=g) + 0.5).to(DEV)
    (y0, g0), (y1, g1) = run_both(stored, factor, sel.to(DEV), params.to(DEV), mean, std)
    close(y1, y0, rtol=1e-4, atol=2e-5)
    close(g1, g0, rtol=1e-4, atol=2e-5)


def test_decode_augment_each_geometric_op():
    g = torch.Generator().manual_seed(9)
    stored = torch.rand(2, 1, 8, 8, generator=g).to(DEV)
    for name, code in dsa.GEOMETRIC.items():
        p = dsa.draw(Strategy.parse(f"flip_{name}"), 8, (8, 8), g)
        assert (p.geo == code).all()
        (y0, g0), (y1, g1) = run_both(stored, 2, None, p.to(DEV), None, None)
        close(y1, y0, rtol=1e-4, atol=2e-5)
        close(g1, g0, rtol=1e-4, atol=2e-5)


def test_decode_only_no_params():
    stored = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(2)).to(DEV)
    (y0, g0), (y1, g1) = run_both(stored, 2, None, None, None, None)
    close(y1, y0, rtol=1e-5, atol=1e-6)
    close(g1, g0, rtol=1e-5, atol=1e-6)


def test_dispatch_forced_triton(monkeypatch):
    monkeypatch.setenv("DASM_BACKEND", "triton")
    stored = torch.rand(1, 1, 8, 8).to(DEV)
    assert ops.backend_for("decode_augment", stored.device) == "triton"
    y = ops.decode_augment(stored, 2)
    close(y, ops.reference("decode_augment")(stored, 2, None, None, None, None), rtol=1e-5,
          atol=1e-6)


@pytest.mark.cuda
def test_matching_step_triton_equals_reference():
    """A whole matching step with the triton backend equals the reference backend (GPU).

    The network's convolutions run in full float32 here: under cuDNN's default TF32 a 1e-7
    difference between the backends' decoded images moves the conv gradients by ~1e-3, and the l1
    metric's sign turns that into differences of 0.07 in a whole class's image gradient (seen on
    the H200, 2026-11-30, in one process of two): that tests TF32, not the kernels."""
    from dasm.rules import resolve
    from dasm.matching import Matcher

    from conftest import random_dataset, smoke_config

    ds = random_dataset(classes=3, per_class=16)
    cfg = resolve(smoke_config("match.batch_real=8", "match.batch_syn=8", "device=cuda"), ds.name,
                  ds.image_size, True)
    m = Matcher(cfg, ds, torch.device("cuda"), torch.Generator().manual_seed(0))
    model = m.new_network()
    images = torch.rand(3, 2, 1, 28, 28, generator=torch.Generator().manual_seed(1)).cuda()
    draws = m.draw(ds.class_index(), 2, 0)
    outs = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for backend in ("reference", "triton"):
            with ops.override(decode_augment=backend, grad_distance=backend):
                outs.append(m.step(model, draws, images, torch.zeros_like(images)))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------- instance_norm_relu_pool
def triton_block(z, w, b, pool, eps):
    from dasm import fused_block

    return fused_block.instance_norm_relu_pool(z, w, b, pool, eps, k_block)


@pytest.mark.parametrize("pool, size", [(True, (4, 4)), (False, (3, 5)), (True, (5, 7))])
def test_block_forward_backward_double_backward(pool, size):
    """Values, first and second derivatives against the reference; (5, 7) pools an odd plane
    (its last row and column get no output and no gradient)."""
    assert_block_matches_reference(triton_block, pool, size, DEV)


def test_block_double_backward_differentiates_the_backward():
    """Finite-difference check of the double backward against the Triton backward itself: the
    backward is linear in the output gradient, so a central difference is exact up to float32
    rounding (the kernels compute in float32, so a float64 gradcheck does not apply)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 2, 4, 4, generator=g).to(DEV)
    w, b = torch.rand(2, generator=g).to(DEV) + 0.5, torch.randn(2, generator=g).to(DEV) * 0.1
    go = torch.randn(1, 2, 2, 2, generator=g).to(DEV)
    u = torch.randn(1, 2, 4, 4, generator=g).to(DEV)
    _, mean, rstd = k_block.forward(z, w, b, True, 1e-5)
    dg, dz, dw = k_block.double_backward(u, go, z, mean, rstd, w, b, True)
    # dL'/dg is linear: compare with a directional finite difference of <u, dz(g)>
    eps = 1e-2
    d = torch.randn(go.shape, generator=g).to(DEV)
    lin = lambda gg: (u * k_block.backward(gg, z, mean, rstd, w, b, True)[0]).sum()  # noqa
    fd = (lin(go + eps * d) - lin(go - eps * d)) / (2 * eps)
    close(fd, (dg * d).sum(), rtol=1e-3, atol=1e-4)


def test_block_dispatch_and_forced_limits():
    from dasm.errors import BackendUnavailable

    z = torch.randn(1, 2, 4, 4).to(DEV)
    w, b = torch.ones(2).to(DEV), torch.zeros(2).to(DEV)
    with ops.override(instance_norm_relu_pool="triton"):
        close(ops.instance_norm_relu_pool(z, w, b), ops.reference("instance_norm_relu_pool")(
            z, w, b, True, 1e-5), rtol=1e-5, atol=1e-6)
        big = torch.zeros(1, 1, 130, 130).to(DEV)
        with pytest.raises(BackendUnavailable, match="exceed"):
            ops.instance_norm_relu_pool(big, torch.ones(1).to(DEV), torch.zeros(1).to(DEV))



# ------------------------------------------------------------------------- launch limits
def test_grad_distance_grid_for_a_100m_parameter_network():
    """The grid of a 100 M-parameter matching network fits CUDA's limits (axis 0: 2^31 - 1,
    axes 1-2: 65,535) for both metrics' kernels, computed without launching; with the chunks on
    the small axis it would not (98k chunks > 65,535)."""
    shapes = [(8192, 8192), (4096, 8192), (512, 4096, 3, 3), (10, 512)]  # ~119 M, 12,810 rows
    layout = ops.GradLayout.from_shapes([f"p{i}" for i in range(len(shapes))], shapes)
    assert layout.numel > 100_000_000
    rows = len(layout.row_starts()) - 1
    chunks = -(-layout.numel // k_dist.BLOCK)
    assert chunks > 65_535  # the old layout (chunks on axis 1) could not launch this
    for C in (10, 1000):
        for work in (chunks, rows):  # l1/mse chunks, cos rows
            grid = k_dist.launch_grid(C, work)
            assert grid == (work, C)
            assert grid[0] <= 2 ** 31 - 1 and grid[1] <= 65_535
    with pytest.raises(ValueError, match="70000 classes"):
        k_dist.launch_grid(70_000, chunks)


@pytest.mark.parametrize("block", [16, 256, 1024, 4096, 8192, k_block.MAX_PLANE])
def test_block_warps_scale_with_the_plane(block):
    """A program of the fused block holds at most ~32 values per thread (no register spill at
    large planes) and never exceeds 16 warps; small planes keep the default 4."""
    warps = k_block.warps_for(block)
    assert 4 <= warps <= 16
    assert block / (warps * 32) <= 32
    if block <= 4096:
        assert warps == 4


def test_decode_augment_transform_limit_is_a_host_error():
    """A geometric transform beyond the kernel's sampling window (here a 100x zoom-out: each
    output pixel spans 100 source pixels) is refused on the host with one clear error (on a GPU
    it was a device assert, which kills the CUDA context); drawn parameters run."""
    params = dsa.draw(Strategy.parse("scale"), 2, (8, 8), torch.Generator().manual_seed(0))
    stored = torch.rand(2, 1, 8, 8).to(DEV)
    k_decode.decode_augment(stored, 1, None, params, None, None)  # drawn: within the window
    extreme = replace(params, geo=torch.full_like(params.geo, dsa.GEO_SCALE),
                      scale=torch.full_like(params.scale, 0.01))
    with pytest.raises(ValueError, match="shrinks by more than"):
        k_decode.decode_augment(stored, 1, None, extreme.to(DEV), None, None)
    if DEV == "cuda":  # parameters on the device are checked on the host too: the context lives
        torch.cuda.synchronize()
