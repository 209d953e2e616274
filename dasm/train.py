"""Train and evaluate a network on any image set: the evaluation protocol.

IDC's protocol: SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch 64, ``epochs`` epochs with
the learning rate x0.2 at 2/3 and 5/6, per-sample DSA and CutMix (p 0.5); the reported number is
the test accuracy after the *last* epoch, mean +- std over repeats (IDC reports its best of four
checks; we do not).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment, ops, rng
from .augment import Strategy
from .data import Dataset, to_float
from .models import build_model, model_options


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    strategy: Strategy = Strategy()
    cutmix: float = 0.5

    @classmethod
    def from_eval(cls, e, epochs: int | None = None) -> "TrainSettings":
        return cls(epochs or e.epochs, e.batch, e.lr, e.momentum, e.weight_decay,
                   Strategy.parse(e.augment, "eval.augment"), e.cutmix)


def mixed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cutmix_p: float,
               generator: torch.Generator, shard: slice | None = None) -> torch.Tensor:
    """Mean cross-entropy of the batch, with CutMix on it with probability ``cutmix_p`` (IDC).

    With ``shard``, only those rows are forwarded and their share of the batch mean is returned
    (the shares of all ranks sum to the mean); the random draws are the same either way.
    """
    n = x.shape[0]
    lam, y_b = 1.0, y
    if cutmix_p > 0 and torch.rand((), generator=generator).item() < cutmix_p:
        x, perm, lam = augment.cutmix(x, generator)
        y_b = y[perm]
    if shard is not None:
        x, y, y_b = x[shard], y[shard], y_b[shard]
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum")
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(out, y_b, reduction="sum")
    return loss / n


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: TrainSettings,
                mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                progress: bool = False, desc: str = "train", data_parallel: bool = False
                ) -> nn.Module:
    """Train ``model`` in place on ``images [N, ch, H, W]`` (uint8, or float in [0, 1]) and
    ``labels [N]``, on the model's device. ``data_parallel``: under torch.distributed, each rank
    forwards a slice of every batch and gradients are summed over ranks."""
    from .distributed import context

    ctx = context() if data_parallel else None
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    size = tuple(images.shape[-2:])
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                          weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[2 * s.epochs // 3, 5 * s.epochs // 6], gamma=0.2)
    model.train()
    n = images.shape[0]
    for _ in tqdm(range(s.epochs), desc=desc, disable=not progress, leave=False,
                  dynamic_ncols=True):
        order = torch.randperm(n, generator=generator).to(device)
        for lo in range(0, n, s.batch):
            idx = order[lo:lo + s.batch]
            x = to_float(images[idx])
            params = augment.draw(s.strategy, len(idx), size, generator,
                                  shared_geometric=True) if s.strategy.enabled else None
            x = ops.decode_augment(x, 1, None, params, mean, std)
            shard = ctx.shard(len(idx)) if ctx is not None and ctx.active else None
            loss = mixed_loss(model, x, labels[idx], s.cutmix, generator, shard)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if shard is not None:
                ctx.all_reduce_grads(model)
            opt.step()
        sched.step()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            batch: int = 500) -> torch.Tensor:
    """Logits ``[N, K]`` of normalised ``images`` (uint8 or float in [0, 1]) in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for lo in range(0, images.shape[0], batch):
        x = to_float(images[lo:lo + batch].to(device))
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        out.append(model(x).float())
    model.train()
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
             batch: int = 500) -> float:
    logits = predict(model, images, mean, std, batch)
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


def eval_model_spec(cfg, name: str | None = None) -> tuple[str, dict]:
    """Registry name and options of the evaluation network ('' / None: the matching ConvNet)."""
    name = name if name is not None else cfg.eval.model
    if not name or name == cfg.model.name:
        return model_options(cfg.model)
    return name, {}


def evaluate_images(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, cfg,
                    model_name: str | None = None, epochs: int | None = None,
                    repeats: int | None = None, tag: str = "eval", progress: bool = False) -> dict:
    """Train ``repeats`` fresh networks on ``images``/``labels`` by the evaluation protocol and
    test each on ``dataset``'s test split. Returns a JSON-ready summary."""
    device = torch.device(cfg.device)
    mean, std = dataset.mean_std(device)
    name, opts = eval_model_spec(cfg, model_name)
    settings = TrainSettings.from_eval(cfg.eval, epochs)
    accs, t0 = [], time.perf_counter()
    for r in range(repeats or cfg.eval.repeats):
        g = rng.generator(cfg.seed, tag, r)
        model = build_model(name, dataset.channels, dataset.num_classes, dataset.image_size,
                            generator=g, device=device, **opts)
        train_model(model, images, labels, settings, mean, std, g, progress,
                    desc=f"{tag} {r + 1}/{repeats or cfg.eval.repeats}")
        accs.append(accuracy(model, dataset.test_images, dataset.test_labels, mean, std,
                             cfg.eval.test_batch))
    return {"model": name, "epochs": settings.epochs, "train_images": int(images.shape[0]),
            "accuracies": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "seconds": round(time.perf_counter() - t0, 2), "reported": "last epoch"}


def equal_step_epochs(epochs: int, factor: int) -> int:
    """Epochs of a decoded set that give it the SGD steps of a real subset at equal IPC."""
    return max(1, math.ceil(epochs / factor ** 2))
