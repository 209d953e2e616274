"""The reference backend: every hot op in plain PyTorch, the specification that each fast path
(:mod:`dasm.kernels`, the extension) is tested against and falls back to. Dispatch is
:mod:`dasm.ops`; these functions are reached through ``ops.reference(op)`` or the ops themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dsa
from .data import normalize
from .formation import tile_shape

COS_EPS = 1e-6


def decode(stored: torch.Tensor, factor: int, sel: torch.Tensor | None) -> torch.Tensor:
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


def decode_augment(stored, factor, sel, params, mean, std):
    x = decode(stored, factor, sel)
    if mean is not None:
        x = normalize(x, mean, std)
    if params is not None and params.strategy.enabled:
        x = dsa.apply_reference(x, params.to(x.device))
    return x


def grad_distance(gr, gs, layout, metric: str):
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


def sample_scores(logits, labels):
    lf = logits.float()
    logp = torch.log_softmax(lf, dim=1)
    loss = -logp.gather(1, labels[:, None]).squeeze(1)
    onehot = F.one_hot(labels, lf.shape[1]).to(lf.dtype)
    el2n = (logp.exp() - onehot).norm(dim=1)
    true = lf.gather(1, labels[:, None]).squeeze(1)
    other = lf.masked_fill(onehot.bool(), float("-inf")).max(dim=1).values
    return loss, el2n, true - other


def accumulate_class_grads(buffer, grads, offsets, classes, scale):
    for g, off in zip(grads, offsets):
        n = g[0].numel()
        buffer[:, off:off + n].index_add_(0, classes, g.reshape(g.shape[0], n).to(buffer.dtype),
                                          alpha=scale)
    return buffer


def instance_norm_relu_pool(z, weight, bias, pool, eps):
    y = F.relu(F.group_norm(z, z.shape[1], weight, bias, eps))
    return F.avg_pool2d(y, 2) if pool else y
