"""The compiled extension ``dasm._C``: loading it, and its fused ConvNet block kernels
(``inrp_*``) in the contract of :mod:`dasm.fused_block`. A leaf: :mod:`dasm.ops` dispatches to it.
"""
from __future__ import annotations

import importlib
import os

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


class BlockKernels:
    """The extension's fused block kernels in :mod:`dasm.fused_block`'s contract."""

    @staticmethod
    def forward(z, weight, bias, pool, eps):
        return ext().inrp_forward(z, weight, bias, pool, eps)

    @staticmethod
    def backward(g, z, mean, rstd, weight, bias, pool):
        return ext().inrp_backward(g, z, mean, rstd, weight, bias, pool)

    @staticmethod
    def double_backward(u, g, z, mean, rstd, weight, bias, pool):
        return ext().inrp_double_backward(u, g, z, mean, rstd, weight, bias, pool)
