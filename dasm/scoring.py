"""Per-sample difficulty of every real training image under a network, and DASM's pools
(rank bands and lack pools).

Scores (``ops.sample_scores``): cross-entropy loss, EL2N (|softmax - onehot|_2) and margin (true
logit minus the best other), without augmentation, in large batches (bf16 autocast and
channels_last on CUDA). Difficulty grows with loss and EL2N and falls with margin.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn

from . import ops
from .data import Dataset, normalize, to_float
from .errors import ConfigError

SCORES = ("loss", "el2n", "margin")


@torch.no_grad()
def score_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
                 batch: int = 1024) -> dict[str, torch.Tensor]:
    """``{"loss", "el2n", "margin"}`` -> ``[N]`` float32 (CPU) for ``images`` uint8/float."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    out = {k: [] for k in SCORES}
    for lo in range(0, images.shape[0], batch):
        x = to_float(images[lo:lo + batch].to(device, non_blocking=True))
        x = normalize(x, mean, std)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            logits = model(x)
        for k, v in zip(SCORES, ops.sample_scores(logits, labels[lo:lo + batch].to(device))):
            out[k].append(v)
    model.train(was_training)
    return {k: torch.cat(v).float().cpu() for k, v in out.items()}


def score_dataset(model: nn.Module, dataset: Dataset, batch: int = 1024) -> dict[str, torch.Tensor]:
    """Scores of every training image. Under torch.distributed each rank scores a slice and
    the slices are gathered, so every rank returns the whole set."""
    from .distributed import context

    ctx = context()
    device = next(model.parameters()).device
    mean, std = dataset.mean_std(device)
    n = dataset.train_images.shape[0]
    part = ctx.shard(n)
    scores = score_images(model, dataset.train_images[part], dataset.train_labels[part], mean,
                          std, batch)
    if not ctx.active:
        return scores
    return {k: ctx.gather_slices(v, n) for k, v in scores.items()}


def difficulty(scores: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Difficulty ``[N]``: higher is harder."""
    if kind not in SCORES:
        raise ConfigError(f"unknown difficulty score {kind!r} (known: {', '.join(SCORES)})")
    return -scores["margin"] if kind == "margin" else scores[kind]


def band_pools(hardness: torch.Tensor, class_index: list[torch.Tensor], easy_drop: float,
                 hard_drop: float, classes: list[str] | None = None) -> list[torch.Tensor]:
    """Per class, the images whose difficulty rank (easiest first) lies in
    ``[floor(easy_drop * n), n - floor(hard_drop * n))``. Ties keep dataset order.
    Returns index tensors (ascending by difficulty). Raises ConfigError on an empty pool."""
    pools = []
    for c, idx in enumerate(class_index):
        order = torch.argsort(hardness[idx], stable=True)
        n = len(idx)
        lo, hi = int(easy_drop * n), n - int(hard_drop * n)
        if hi <= lo:
            name = classes[c] if classes else str(c)
            raise ConfigError(f"the difficulty band [easy_drop={easy_drop}, "
                              f"hard_drop={hard_drop}] leaves no image of class {name!r} "
                              f"({n} images)")
        pools.append(idx[order[lo:hi]])
    return pools


def lack_pools(scores: dict[str, torch.Tensor], class_index: list[torch.Tensor],
               lack_margin: float, tail_drop: float, coverage: float, need: int,
               free: torch.Tensor, generator: torch.Generator, fill: str = "random",
               multiple: float = 1.0, known: torch.Tensor | None = None):
    """Per class, the real images a network trained on S_<k lacks (DASM's pool of segment k).

    scores: ``{"loss", "margin"} -> [N]`` under that network; free: ``[N]`` bool, images no
    earlier init used; need: images the segment's init draws per class. Per class:
    ``tail`` = the hardest ``floor(tail_drop * n)`` by loss (outliers, doubtful labels);
    ``lacking`` = margin below ``lack_margin``, outside the tail; ``rest`` = neither. The pool is
    ``lacking`` plus a seeded random share of ``rest`` of size
    ``ceil(coverage / (1 - coverage) * |lacking|)`` (so ``coverage`` is the rest's share of the
    pool), topped up from the rest, in the same seeded order, until it holds ``need`` free images
    and at least ``ceil(multiple * need)`` images in all (or every image outside the tail): with
    ``multiple > 1`` the real batches of the matching never come only from the images the init
    draws, even in a class the network already holds firmly.

    ``known``: ``[N]`` bool or None; where given, an image counts as lacking only if it is
    known (a network trained on real data gets it right, CCFS's candidates); the others join
    the rest.

    ``fill`` says what a class with too few lacking images gets (a class the network already
    holds firmly, common at large IPC): ``random``: the random top-up above; ``margin``: first
    the free images of the rest with the smallest margins join ``lacking`` until it holds
    ``ceil((1 - coverage) * need)`` free images, so that every pool keeps its share of the
    images the network holds least firmly.

    Returns ``(pools, stats)``: ascending index tensors, and per-class counts
    ``{"lacking", "filled", "coverage", "topped_up"}`` (``lacking``: by the margin threshold;
    ``filled``: added to them in margin order).
    """
    if fill not in ("random", "margin"):
        raise ConfigError(f"config key 'dasm.lack_fill' must be random or margin, got {fill!r}")
    pools, stats = [], {"lacking": [], "filled": [], "coverage": [], "topped_up": []}
    for idx in class_index:
        n = len(idx)
        margin, is_free = scores["margin"][idx], free[idx]
        order = torch.argsort(scores["loss"][idx], descending=True, stable=True)
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[:int(tail_drop * n)]] = False
        lacking = keep & (margin < lack_margin)
        if known is not None:
            lacking &= known[idx]
        threshold_count = int(lacking.sum())
        if fill == "margin":
            short = math.ceil((1 - coverage) * need) - int((lacking & is_free).sum())
            firm = (keep & ~lacking & is_free).nonzero().squeeze(1)
            lacking[firm[torch.argsort(margin[firm], stable=True)][:max(short, 0)]] = True
        rest = (keep & ~lacking).nonzero().squeeze(1)
        rest = rest[torch.randperm(len(rest), generator=generator)]
        share = min(len(rest), math.ceil(coverage / (1 - coverage) * int(lacking.sum())))
        chosen = lacking.clone()
        chosen[rest[:share]] = True
        left = rest[share:]
        short = need - int((chosen & is_free).sum())
        extra = left[is_free[left]][:max(short, 0)]
        chosen[extra] = True
        short = math.ceil(multiple * need) - int(chosen.sum())
        if short > 0:  # the pool's floor: a multiple of the init (free or not, seeded order)
            more = left[~chosen[left]][:short]
            chosen[more] = True
            extra = torch.cat([extra, more])
        pools.append(idx[chosen])
        counts = (threshold_count, int(lacking.sum()) - threshold_count, share, len(extra))
        for key, v in zip(stats, counts):
            stats[key].append(v)
    return pools, stats
