"""A faithful per-class matching loop in IDC's style, written from the algorithm (the speed
baseline of docs/protocol.md). Plain eager PyTorch, as IDC runs it:

* the network is built from ``nn.Conv2d`` / ``nn.GroupNorm`` / ``nn.ReLU`` / ``nn.AvgPool2d``;
* per class: real batch and decoded synthetic batch (pad, crop the f x f tiles, concatenate,
  ``nn.Upsample`` bilinear, subsample), concatenated, normalised, one eager DSA pass with shared
  parameters (colour, one geometric op, cutout) on the concatenation;
* ``matchloss``: CE on each half, ``autograd.grad`` over all parameters (real detached,
  synthetic with ``create_graph``), a per-layer distance summed over the conv weights;
* ``optim_img.zero_grad(); loss.backward(); optim_img.step(); loss.item()`` per class.

It consumes the same random draws as :class:`dasm.matching.Matcher` (``StepDraws``), so its
per-class losses can be checked against the engine's: same mathematics, different code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class IDCConvNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 128, depth: int = 3,
                 im_size: int = 28):
        super().__init__()
        layers, cin, size = [], channels, im_size + (4 if im_size == 28 else 0)
        for d in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=3 if (d == 0 and im_size == 28) else 1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2, 2)]
            cin, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).view(x.shape[0], -1))

    def load_from(self, other: nn.Module) -> "IDCConvNet":
        """Copy the weights of a dasm ConvNet (same parameter order)."""
        with torch.no_grad():
            for p, q in zip(self.parameters(), other.parameters()):
                p.copy_(q)
        return self


def decode_zoom(img: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC's decode: tile-major concatenation of the f x f tiles, upsampled to full size."""
    h = img.shape[-1]
    if factor == 1:
        return img
    remained = h % factor
    if remained > 0:
        img = F.pad(img, pad=(0, factor - remained, 0, factor - remained), value=0.5)
    s = math.ceil(h / factor)
    crops = [img[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(factor)
             for j in range(factor)]
    return nn.Upsample(size=(h, h), mode="bilinear")(torch.cat(crops))


def diffaug_shared(x: torch.Tensor, p, row: int) -> torch.Tensor:
    """IDC's DiffAug(batch=True): one draw (row ``row`` of DSAParams ``p``) for the whole batch."""
    st = p.strategy
    if st.flip and bool(p.flip[row]):
        x = x.flip(3)
    if st.color:
        x = x + float(p.brightness[row])
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * float(p.saturation[row]) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - m) * float(p.contrast[row]) + m
    geo = int(p.geo[row])
    n, _, H, W = x.shape
    if geo == 1:  # crop: pad by one, index with clamped shifted grids
        tx, ty = int(p.shift[row, 0]), int(p.shift[row, 1])
        gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(H), torch.arange(W), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, H + 1)
        gy = torch.clamp(gy + ty + 1, 0, W + 1)
        x = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    elif geo in (2, 3):
        if geo == 2:
            theta = torch.tensor([[float(p.scale[row, 0]), 0, 0], [0, float(p.scale[row, 1]), 0]])
        else:
            a = float(p.angle[row])
            theta = torch.tensor([[math.cos(a), math.sin(-a), 0], [math.sin(a), math.cos(a), 0]])
        grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, align_corners=False)
    if st.cutout:
        lo, hi = p.cutout_box()
        mask = torch.ones(n, H, W)
        mask[:, int(lo[row, 0]):int(hi[row, 0]), int(lo[row, 1]):int(hi[row, 1])] = 0
        x = x * mask.unsqueeze(1)
    return x.contiguous()


def dist(x: torch.Tensor, y: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mse":
        return (x - y).pow(2).sum()
    if method == "l1":
        return (x - y).abs().sum()
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    return torch.sum(1 - torch.sum(x * y, dim=-1) / (torch.norm(x, dim=-1) * torch.norm(y, dim=-1)
                                                       + 1e-6))


def matchloss(img_real, img_syn, lab_real, lab_syn, model, metric):
    criterion = nn.CrossEntropyLoss()
    g_real = torch.autograd.grad(criterion(model(img_real), lab_real), list(model.parameters()))
    g_real = [g.detach() for g in g_real]
    g_syn = torch.autograd.grad(criterion(model(img_syn), lab_syn), list(model.parameters()),
                                create_graph=True)
    loss = None
    for gr, gs in zip(g_real, g_syn):
        if gr.dim() != 4:  # conv weights only (IDC: bias=False, fc=False)
            continue
        d = dist(gr, gs, metric)
        loss = d if loss is None else loss + d
    return loss


class BaselineLoop:
    """IDC's inner step over all classes, on a synthetic tensor ``[C * n, ch, H, W]``."""

    def __init__(self, model: IDCConvNet, real_images: torch.Tensor, mean, std, factor: int,
                 metric: str, lr_img: float, mom_img: float = 0.5):
        self.model, self.real, self.factor, self.metric = model, real_images, factor, metric
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.lr, self.mom = lr_img, mom_img

    def run(self, images: torch.Tensor, momentum: torch.Tensor, draws) -> tuple:
        """One matching step for every class (draws: ``dasm.matching.StepDraws``)."""
        C, n = images.shape[:2]
        data = images.reshape(C * n, *images.shape[2:]).clone().requires_grad_(True)
        optim_img = torch.optim.SGD([data], lr=self.lr, momentum=self.mom)
        optim_img.state[data]["momentum_buffer"] = momentum.reshape(data.shape).clone()
        losses = []
        for c in range(C):
            img = self.real[draws.real[c]].float() / 255
            lab = torch.full((img.shape[0],), c, dtype=torch.long)
            dec = decode_zoom(data[c * n:(c + 1) * n], self.factor)  # tile-major
            f2 = self.factor ** 2
            # dasm's decoded index m * f^2 + t is IDC's tile-major row t * n + m
            sel = draws.syn[c]
            img_syn = dec[(sel % f2) * n + sel // f2]
            lab_syn = torch.full((img_syn.shape[0],), c, dtype=torch.long)
            both = torch.cat([img, img_syn])
            both = diffaug_shared((both - self.mean) / self.std, draws.dsa, c)
            k = img.shape[0]
            loss = matchloss(both[:k], both[k:], lab, lab_syn, self.model, self.metric)
            losses.append(loss.item())
            optim_img.zero_grad()
            loss.backward()
            optim_img.step()
        buf = optim_img.state[data]["momentum_buffer"].view_as(images)
        return data.detach().view_as(images), buf, torch.tensor(losses)
