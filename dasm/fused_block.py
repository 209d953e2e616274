"""Autograd of the fused ConvNet block tail (instance norm, ReLU, 2x2 average pool), twice
differentiable with respect to its input, over any implementation of three kernels:

* ``forward(z, w, b, pool, eps) -> (out, mean [N, C], rstd [N, C])``
* ``backward(g, z, mean, rstd, w, b, pool) -> (dz, dw, db)``
* ``double_backward(u, g, z, mean, rstd, w, b, pool) -> (dg, dz, dw)``

(the extension :mod:`dasm._ext` and the Triton kernels ``dasm.kernels.instance_norm_relu_pool``
provide them). Gradient matching backpropagates through the synthetic gradient, so the block's
backward is itself a Function (``_Backward``) whose backward is the fused double backward.

The Functions run under ``torch.func`` transforms (``setup_context`` style) and have vmap rules,
so the GPU engine's class batching (``vmap(grad(...))``) uses the fused block too: the block
works per (sample, channel) plane, so a vmapped dimension (the classes) folds into the samples
for the forward; the backward and double backward, whose weight gradients sum over samples,
run per vmapped element.
"""
from __future__ import annotations

import torch


def _front(x: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """``x`` with its vmapped dimension first (expanded when it has none)."""
    if dim is None:
        return x.unsqueeze(0).expand(size, *x.shape)
    return x.movedim(dim, 0)


def _per_element(fn, info, in_dims, tensors, *static):
    """A vmap rule by a loop: ``fn`` on every vmapped element, outputs stacked on dim 0."""
    B = info.batch_size
    tensors = [_front(t, d, B) for t, d in zip(tensors, in_dims)]
    outs = [fn(*(t[i] for t in tensors), *static) for i in range(B)]
    stacked = tuple(torch.stack(o) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


class _DoubleBackward(torch.autograd.Function):
    """The double backward as a Function, so that it runs under vmap too (third derivatives:
    not implemented; matching needs the second)."""

    @staticmethod
    def forward(u, g, z, weight, bias, mean, rstd, pool, impl):
        return tuple(impl.double_backward(u, g, z, mean, rstd, weight, bias, pool))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("instance_norm_relu_pool (fused): third derivatives")

    @staticmethod
    def vmap(info, in_dims, u, g, z, weight, bias, mean, rstd, pool, impl):
        return _per_element(_DoubleBackward.apply, info, in_dims[:7],
                            (u, g, z, weight, bias, mean, rstd), pool, impl)


class _Backward(torch.autograd.Function):
    @staticmethod
    def forward(g, z, weight, bias, mean, rstd, pool, impl):
        return tuple(impl.backward(g, z, mean, rstd, weight, bias, pool))

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, z, weight, bias, mean, rstd, pool, impl = inputs
        ctx.save_for_backward(g, z, weight, bias, mean, rstd)
        ctx.pool, ctx.impl = pool, impl
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, u, u_gw, u_gb):
        if u_gw is not None or u_gb is not None:
            raise NotImplementedError(
                "instance_norm_relu_pool (fused): second derivatives through the norm's weight "
                "and bias gradients are not implemented; match.match_bias uses the reference")
        if u is None:
            return (None,) * 8
        g, z, weight, bias, mean, rstd = ctx.saved_tensors
        ug, uz, uw = _DoubleBackward.apply(u, g, z, weight, bias, mean, rstd, ctx.pool, ctx.impl)
        need = ctx.needs_input_grad
        return (ug if need[0] else None, uz if need[1] else None, uw if need[2] else None,
                None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, g, z, weight, bias, mean, rstd, pool, impl):
        return _per_element(_Backward.apply, info, in_dims[:6], (g, z, weight, bias, mean, rstd),
                            pool, impl)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(z, weight, bias, pool, eps, impl):
        return tuple(impl.forward(z, weight, bias, pool, eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight, bias, pool, eps, impl = inputs
        _, mean, rstd = output
        ctx.save_for_backward(z, weight, bias, mean, rstd)
        ctx.pool, ctx.impl = pool, impl
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, g, _g_mean, _g_rstd):
        z, weight, bias, mean, rstd = ctx.saved_tensors
        gz, gw, gb = _Backward.apply(g, z, weight, bias, mean, rstd, ctx.pool, ctx.impl)
        need = ctx.needs_input_grad
        return gz, gw if need[1] else None, gb if need[2] else None, None, None, None

    @staticmethod
    def vmap(info, in_dims, z, weight, bias, pool, eps, impl):
        if in_dims[1] is not None or in_dims[2] is not None:  # per-element weights: a loop
            return _per_element(_Block.apply, info, in_dims[:3], (z, weight, bias), pool, eps,
                                impl)
        z = _front(z, in_dims[0], info.batch_size)
        out, mean, rstd = _Block.apply(z.reshape(-1, *z.shape[2:]), weight, bias, pool, eps, impl)
        B = info.batch_size
        return (out.view(B, -1, *out.shape[1:]), mean.view(B, -1, mean.shape[-1]),
                rstd.view(B, -1, rstd.shape[-1])), (0, 0, 0)


def instance_norm_relu_pool(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            pool: bool, eps: float, impl) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, H', W']`` through the kernels of ``impl``."""
    return _Block.apply(z, weight, bias, bool(pool), float(eps), impl)[0]
