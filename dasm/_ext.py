"""The compiled extension ``dasm._C``: loading it, and the autograd wrappers of its fused
ConvNet block (``inrp_*``). A leaf: :mod:`dasm.ops` dispatches to it.

Two Functions make the block twice differentiable, which gradient matching needs (it
backpropagates through the synthetic gradient):

* ``_Block``          z -> instance norm, ReLU, pool; its backward *is* ``_BlockBackward``;
* ``_BlockBackward``  (g, z) -> grad z (and the affine-parameter gradients); its backward is the
                      fused ``inrp_double_backward`` kernel.
"""
from __future__ import annotations

import importlib
import os

import torch

_module = None
_error: str | None = None


def ext():
    """The compiled extension ``dasm._C`` or None (the reason is in :func:`ext_error`)."""
    global _module, _error
    if _module is None and _error is None:
        if os.environ.get("DASM_NO_EXT") == "1":
            _error = "disabled by DASM_NO_EXT=1"
        else:
            try:
                _module = importlib.import_module("dasm._C")
            except ImportError as e:
                _error = f"dasm._C is not built or does not load ({e})"
    return _module


def ext_error() -> str | None:
    ext()
    return _error


class _BlockBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, z, weight, bias, mean, rstd, pool):
        gz, gw, gb = ext().inrp_backward(g, z, mean, rstd, weight, bias, pool)
        ctx.save_for_backward(g, z, weight, bias, mean, rstd)
        ctx.pool = pool
        ctx.set_materialize_grads(False)
        return gz, gw, gb

    @staticmethod
    def backward(ctx, u, u_gw, u_gb):
        if u_gw is not None or u_gb is not None:
            raise NotImplementedError(
                "instance_norm_relu_pool (ext): second derivatives through the norm's weight and "
                "bias gradients are not implemented; match.match_bias uses the reference block")
        if u is None:
            return (None,) * 7
        g, z, weight, bias, mean, rstd = ctx.saved_tensors
        ug, uz, uw = ext().inrp_double_backward(u, g, z, mean, rstd, weight, bias, ctx.pool)
        need = ctx.needs_input_grad
        return (ug if need[0] else None, uz if need[1] else None, uw if need[2] else None,
                None, None, None, None)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, pool, eps):
        out, mean, rstd = ext().inrp_forward(z, weight, bias, pool, eps)
        ctx.save_for_backward(z, weight, bias, mean, rstd)
        ctx.pool = pool
        return out

    @staticmethod
    def backward(ctx, g):
        z, weight, bias, mean, rstd = ctx.saved_tensors
        gz, gw, gb = _BlockBackward.apply(g, z, weight, bias, mean, rstd, ctx.pool)
        need = ctx.needs_input_grad
        return gz, gw if need[1] else None, gb if need[2] else None, None, None


def instance_norm_relu_pool(z, weight, bias, pool: bool, eps: float):
    return _Block.apply(z, weight, bias, bool(pool), float(eps))
