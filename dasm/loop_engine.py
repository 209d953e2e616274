"""IDC's per-class matching loop, kept beside the batched engine as its oracle."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops


def step_loop(matcher, model: nn.Module, draws, images: torch.Tensor, momentum: torch.Tensor,
              frozen: torch.Tensor | None):
    """IDC's literal loop (``match.engine: loop``), the oracle of the batched engine: per class
    a real and a synthetic gradient, the distance, backward and a ``torch.optim.SGD`` step on the
    one image tensor; frozen images join the class's synthetic batch as constants. Same
    arguments (``matcher``: the :class:`~dasm.matching.Matcher`) and result as its ``step``."""
    C = matcher.C
    leaf = images.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=matcher.m.lr_img * matcher.lr_scale, momentum=matcher.m.mom_img)
    if matcher.m.mom_img > 0:
        opt.state[leaf]["momentum_buffer"] = momentum.detach().clone()
    weights = [dict(model.named_parameters())[n] for n in matcher.matched]
    losses = []
    joint = matcher.m.image_update == "joint"
    total = 0
    with matcher._block_override():
        for c in range(C):
            if not matcher.ctx.owns(c):  # another rank's class: IDC's momentum-only step here
                losses.append(torch.zeros((), device=matcher.device))
                if not joint:
                    leaf.grad = torch.zeros_like(leaf)
                    opt.step()
                continue
            cls = torch.tensor([c])
            xr = matcher._real_batch(draws.real[c], matcher._rows(draws.dsa, cls, draws.real.shape[1]))
            gr = matcher._class_grad(model, weights, xr, c, create_graph=False)
            xs = matcher._decoded(leaf, draws.syn[c:c + 1], cls, draws.dsa)
            if draws.frozen is not None:
                xf = matcher._decoded(frozen, draws.frozen[c:c + 1], cls, draws.dsa)
                xs = torch.cat([xs, xf.detach()])
            gs = matcher._class_grad(model, weights, xs, c, create_graph=True)
            flat = lambda gg: torch.cat([t.reshape(1, -1) for t in gg], dim=1)  # noqa: E731
            loss = ops.grad_distance(flat(gr).detach(), flat(gs), matcher.layout, matcher.m.metric)[0]
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
    buf = opt.state[leaf].get("momentum_buffer") if matcher.m.mom_img > 0 else momentum
    return leaf.detach(), buf.detach() if buf is not None else momentum, torch.stack(losses)
