"""IDC's per-class matching loop, written out from the algorithm: the oracle of the batched engine.

It shares with the batched engine only the step's random draws (``StepDraws``), the network and
the settings; everything the engine computes through its own helpers and fast ops is computed
here directly: IDC's decode (tiles split row-major, bilinear upsampling), the reference DSA ops
(:mod:`dasm.dsa`), normalisation, per-class gradients by ``torch.autograd.grad``, the layer-wise
distance, and ``torch.optim.SGD`` on the one image tensor after every class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dsa, ops
from .data import normalize, to_float


def idc_decode(stored: torch.Tensor, factor: int) -> torch.Tensor:
    """``[N, ch, H, W]`` -> ``[N * f^2, ch, H, W]``: per stored image its ``f x f`` tiles,
    row-major, each upsampled bilinearly (align_corners=False) to the full size (the image is
    padded with 0.5 to a multiple of ``f`` first)."""
    if factor == 1:
        return stored
    N, ch, H, W = stored.shape
    th, tw = -(-H // factor), -(-W // factor)
    x = F.pad(stored, (0, tw * factor - W, 0, th * factor - H), value=0.5)
    tiles = [x[:, :, i * th:(i + 1) * th, j * tw:(j + 1) * tw]
             for i in range(factor) for j in range(factor)]
    tiles = torch.stack(tiles, dim=1).reshape(N * factor * factor, ch, th, tw)
    return F.interpolate(tiles, size=(H, W), mode="bilinear", align_corners=False)


def layer_distance(gr: list[torch.Tensor], gs: list[torch.Tensor], metric: str) -> torch.Tensor:
    """IDC's match distance, summed over the matched layers: l1, mse, or cos (per output
    channel 1 - cosine, eps 1e-6)."""
    total = 0
    for a, b in zip(gr, gs):
        if metric == "l1":
            total = total + (a - b).abs().sum()
        elif metric == "mse":
            total = total + ((a - b) ** 2).sum()
        else:
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cos = (a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1) + 1e-6)
            total = total + (1 - cos).sum()
    return total


def step_loop(matcher, model: nn.Module, draws, images: torch.Tensor, momentum: torch.Tensor,
              frozen: torch.Tensor | None, lr: float):
    """IDC's literal loop (``match.engine: loop``): per class a real and a synthetic gradient,
    the distance, backward and a ``torch.optim.SGD`` step (``lr``, ``match.mom_img``) on the one
    image tensor; frozen images join the class's synthetic batch as constants. Same arguments
    and result as :meth:`dasm.matching.Matcher.step`."""
    m, C, device = matcher.m, matcher.C, matcher.device
    mean, std = matcher.mean, matcher.std
    leaf = images.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=lr, momentum=m.mom_img)
    if m.mom_img > 0:
        opt.state[leaf]["momentum_buffer"] = momentum.detach().clone()
    named = dict(model.named_parameters())
    weights = [named[n] for n in matcher.matched]
    joint = m.image_update == "joint"

    def augmented(x: torch.Tensor, c: int) -> torch.Tensor:
        rows = draws.dsa.index(torch.full((x.shape[0],), c, dtype=torch.int64))
        x = normalize(x, mean, std)
        return dsa.apply_reference(x, rows.to(x.device)) if rows.strategy.enabled else x

    def grads(x: torch.Tensor, c: int, graph: bool) -> list[torch.Tensor]:
        y = torch.full((x.shape[0],), c, dtype=torch.int64, device=device)
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), weights,
                                        create_graph=graph))

    losses, total = [], 0
    with ops.override(instance_norm_relu_pool="reference"):
        for c in range(C):
            if not matcher.ctx.owns(c):  # another rank's class: IDC's momentum-only step here
                losses.append(torch.zeros((), device=device))
                if not joint:
                    leaf.grad = torch.zeros_like(leaf)
                    opt.step()
                continue
            xr = augmented(to_float(matcher.real_images[draws.real[c].to(device)]), c)
            gr = [g.detach() for g in grads(xr, c, False)]
            xs = augmented(idc_decode(leaf[c], draws.factor)[draws.syn[c].to(device)], c)
            if draws.frozen is not None:
                xf = idc_decode(frozen[c], draws.frozen_factor)[draws.frozen[c].to(device)]
                xs = torch.cat([xs, augmented(xf, c).detach()])
            loss = layer_distance(gr, grads(xs, c, True), m.metric)
            losses.append(loss.detach())
            if joint:
                total = total + loss
                continue
            opt.zero_grad()
            loss.backward(inputs=[leaf])
            opt.step()
        if joint:
            opt.zero_grad()
            total.backward(inputs=[leaf])
            opt.step()
    buf = opt.state[leaf].get("momentum_buffer") if m.mom_img > 0 else momentum
    return leaf.detach(), buf.detach() if buf is not None else momentum, torch.stack(losses)
