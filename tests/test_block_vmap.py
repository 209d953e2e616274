"""The fused block under ``torch.func.vmap`` (the GPU matching engine's class batching): values,
per-class first derivatives and the second derivatives through them equal the reference's, for
the extension's block (CPU) and the Triton block (interpreter or GPU)."""
import importlib.util
import os

import pytest
import torch
from torch.func import grad, vmap

from dasm import fused_block, ops


def implementations():
    out = []
    if ops.backend_for("instance_norm_relu_pool", "cpu") == "ext":
        from dasm import _ext
        out.append(pytest.param(_ext.BlockKernels, "cpu", id="ext"))
    if importlib.util.find_spec("triton") is not None and (
            torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        from dasm.kernels import instance_norm_relu_pool as k
        out.append(pytest.param(k, "cuda" if torch.cuda.is_available() else "cpu", id="triton"))
    return out


@pytest.mark.parametrize("impl, device", implementations())
@pytest.mark.parametrize("pool", [True, False])
def test_block_under_vmap_first_and_second_derivatives(impl, device, pool):
    g = torch.Generator().manual_seed(3)
    B, N, C, size = 3, 2, 4, (5, 6)
    z0 = torch.randn(B, N, C, *size, generator=g).to(device)
    w = torch.randn(C, generator=g).to(device)
    b = (torch.randn(C, generator=g) * 0.5).to(device)
    out_shape = (B, N, C, size[0] // 2, size[1] // 2) if pool else (B, N, C, *size)
    proj = torch.randn(out_shape, generator=g).to(device)
    v = torch.randn(z0.shape, generator=g).to(device)
    fused = lambda zz, w_, b_: fused_block.instance_norm_relu_pool(zz, w_, b_, pool, 1e-5, impl)  # noqa: E731
    ref = lambda zz, w_, b_: ops.reference("instance_norm_relu_pool")(zz, w_, b_, pool, 1e-5)  # noqa: E731
    results = []
    for block in (fused, ref):
        def loss(w_, b_, zz, pp):
            return (block(zz, w_, b_) * pp).sum()

        z = z0.clone().requires_grad_()
        out = vmap(block, in_dims=(0, None, None))(z, w, b)
        gw, gb, gz = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0))(w, b, z, proj)
        (second,) = torch.autograd.grad((gz * v).sum(), z)  # through the per-class gradients
        results.append((out.detach(), gw.detach(), gb.detach(), gz.detach(), second))
    for name, a, r in zip(("out", "dw per class", "db per class", "dz", "d2"), *results):
        torch.testing.assert_close(a.cpu(), r.cpu(), rtol=1e-4, atol=1e-5, msg=name)
    assert results[0][1].shape == (B, C)  # one weight gradient per class, not their sum
