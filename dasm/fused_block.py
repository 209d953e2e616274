"""Autograd of the fused ConvNet block tail (instance norm, ReLU, 2x2 average pool), twice
differentiable with respect to its input, over any implementation of three kernels:

* ``forward(z, w, b, pool, eps) -> (out, mean [N, C], rstd [N, C])``
* ``backward(g, z, mean, rstd, w, b, pool) -> (dz, dw, db)``
* ``double_backward(u, g, z, mean, rstd, w, b, pool) -> (dg, dz, dw)``

(the extension :mod:`dasm._ext` and the Triton kernels ``dasm.kernels.instance_norm_relu_pool``
provide them). Gradient matching backpropagates through the synthetic gradient, so the block's
backward is itself a Function (``_Backward``) whose backward is the fused double backward.
"""
from __future__ import annotations

import torch


class _Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, z, weight, bias, mean, rstd, pool, impl):
        gz, gw, gb = impl.backward(g, z, mean, rstd, weight, bias, pool)
        ctx.save_for_backward(g, z, weight, bias, mean, rstd)
        ctx.pool, ctx.impl = pool, impl
        ctx.set_materialize_grads(False)
        return gz, gw, gb

    @staticmethod
    def backward(ctx, u, u_gw, u_gb):
        if u_gw is not None or u_gb is not None:
            raise NotImplementedError(
                "instance_norm_relu_pool (fused): second derivatives through the norm's weight "
                "and bias gradients are not implemented; match.match_bias uses the reference")
        if u is None:
            return (None,) * 8
        g, z, weight, bias, mean, rstd = ctx.saved_tensors
        ug, uz, uw = ctx.impl.double_backward(u, g, z, mean, rstd, weight, bias, ctx.pool)
        need = ctx.needs_input_grad
        return (ug if need[0] else None, uz if need[1] else None, uw if need[2] else None,
                None, None, None, None, None)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, pool, eps, impl):
        out, mean, rstd = impl.forward(z, weight, bias, pool, eps)
        ctx.save_for_backward(z, weight, bias, mean, rstd)
        ctx.pool, ctx.impl = pool, impl
        return out

    @staticmethod
    def backward(ctx, g):
        z, weight, bias, mean, rstd = ctx.saved_tensors
        gz, gw, gb = _Backward.apply(g, z, weight, bias, mean, rstd, ctx.pool, ctx.impl)
        need = ctx.needs_input_grad
        return gz, gw if need[1] else None, gb if need[2] else None, None, None, None


def instance_norm_relu_pool(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            pool: bool, eps: float, impl) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H', W']`` through the kernels of ``impl``."""
    return _Block.apply(z, weight, bias, bool(pool), float(eps), impl)
