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
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dsa, ops, rng
from .dsa import Strategy
from .data import Dataset, normalize, to_float
from .errors import DataError
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
        x, perm, lam = dsa.cutmix(x, generator)
        y_b = y[perm]
    if shard is not None:
        x, y, y_b = x[shard], y[shard], y_b[shard]
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum")
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(out, y_b, reduction="sum")
    return loss / n


@dataclass(frozen=True)
class SoftLabels:
    """Soft targets of an evaluation (``eval.labels``): the teacher's softmax at
    ``temperature``, from ``logits [N, K]`` stored for the training images (``stored``: one
    label per image, mixed like the images under CutMix) or from ``teacher`` run on every
    augmented batch (``teacher``: the label of what the student sees). See :func:`soft_loss`."""
    temperature: float
    logits: torch.Tensor | None = None
    teacher: nn.Module | None = None


def soft_loss(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, soft: SoftLabels,
              cutmix_p: float, generator: torch.Generator,
              shard: slice | None = None) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (the gradient scale of T = 1), summed
    over the batch ``x`` (training rows ``rows``) and divided by its size; CutMix draws as in
    :func:`mixed_loss`, so the augmentation stream is the hard-label one."""
    n = x.shape[0]
    lam, perm = 1.0, None
    if cutmix_p > 0 and torch.rand((), generator=generator).item() < cutmix_p:
        x, perm, lam = dsa.cutmix(x, generator)
    T = soft.temperature
    if soft.teacher is not None:
        with torch.no_grad():
            target = F.softmax(soft.teacher(x).float() / T, dim=1)
    else:
        target = F.softmax(soft.logits[rows].float() / T, dim=1)
        if lam < 1.0:  # the KL's gradient is linear in the target: mixing targets = mixing losses
            target = lam * target + (1 - lam) * target[perm]
    if shard is not None:
        x, target = x[shard], target[shard]
    out = model(x)
    loss = F.kl_div(F.log_softmax(out.float() / T, dim=1), target, reduction="sum")
    return loss * (T * T) / n


def network_optimizer(model: nn.Module, m) -> torch.optim.Optimizer:
    """IDC's optimiser of the matching network (``m``: the ``match`` config section)."""
    return torch.optim.SGD(model.parameters(), lr=m.net_lr, momentum=m.net_momentum,
                           weight_decay=m.net_weight_decay)


def network_update(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor, pool: torch.Tensor, m, strategy: Strategy,
                   mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> None:
    """IDC's training of the matching network between matching steps: ``m.n_data`` samples of
    SGD on real ``images [N, ch, H, W]`` (uint8, on the model's device) / ``labels [N]`` drawn
    from ``pool`` (indices; a small pool cycles), batch ``m.net_batch``, CutMix with probability
    ``m.net_cutmix`` and per-sample DSA ``strategy``. Data-parallel under torch.distributed."""
    from .distributed import context

    if m.n_data == 0:
        return
    ctx = context()
    device = images.device
    steps = math.ceil(m.n_data / m.net_batch)
    order = pool[torch.randperm(len(pool), generator=generator)]
    if len(order) < steps * m.net_batch:
        order = order.repeat(math.ceil(steps * m.net_batch / len(order)))
    for i in range(steps):
        idx = order[i * m.net_batch:(i + 1) * m.net_batch]
        x = to_float(images[idx.to(device)])
        y = labels[idx].to(device)
        params = dsa.draw(strategy, len(idx), tuple(images.shape[-2:]), generator,
                              shared_geometric=True)
        x = ops.decode_augment(x, 1, None, params, mean, std)
        shard = ctx.shard(len(idx)) if ctx.active else None
        loss = mixed_loss(model, x, y, m.net_cutmix, generator, shard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ctx.all_reduce_grads(model)
        opt.step()


def train_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: TrainSettings,
                mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                progress: bool = False, desc: str = "train", data_parallel: bool = False,
                on_epoch: Callable[[int, nn.Module], None] | None = None,
                soft: SoftLabels | None = None) -> nn.Module:
    """Train ``model`` in place on ``images [N, ch, H, W]`` (uint8, or float in [0, 1]) and
    ``labels [N]``, on the model's device. ``data_parallel``: under torch.distributed, each rank
    forwards a slice of every batch and gradients are summed over ranks. ``on_epoch(e, model)``
    is called after epoch ``e`` (1-based). ``soft``: train on soft labels (:func:`soft_loss`)."""
    from .distributed import context

    ctx = context() if data_parallel else None
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    if soft is not None and soft.logits is not None:
        if soft.logits.shape[0] != images.shape[0]:
            raise DataError(f"{soft.logits.shape[0]} soft labels for {images.shape[0]} images")
        soft = SoftLabels(soft.temperature, logits=soft.logits.to(device))
    size = tuple(images.shape[-2:])
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                          weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[2 * s.epochs // 3, 5 * s.epochs // 6], gamma=0.2)
    model.train()
    n = images.shape[0]
    for epoch in tqdm(range(s.epochs), desc=desc, disable=not progress, leave=False,
                  dynamic_ncols=True):
        order = torch.randperm(n, generator=generator).to(device)
        for lo in range(0, n, s.batch):
            idx = order[lo:lo + s.batch]
            x = to_float(images[idx])
            params = dsa.draw(s.strategy, len(idx), size, generator,
                                  shared_geometric=True) if s.strategy.enabled else None
            x = ops.decode_augment(x, 1, None, params, mean, std)
            shard = ctx.shard(len(idx)) if ctx is not None and ctx.active else None
            if soft is None:
                loss = mixed_loss(model, x, labels[idx], s.cutmix, generator, shard)
            else:
                loss = soft_loss(model, x, idx, soft, s.cutmix, generator, shard)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if shard is not None:
                ctx.all_reduce_grads(model)
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
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
        x = normalize(x, mean, std)
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
                    repeats: int | None = None, tag: str = "eval", progress: bool = False,
                    soft: SoftLabels | None = None) -> dict:
    """Train ``repeats`` fresh networks on ``images``/``labels`` (or ``soft`` labels) by the
    evaluation protocol and test each on ``dataset``'s test split. Returns a JSON-ready
    summary."""
    if dataset.test_images.shape[0] == 0:
        raise DataError(f"{dataset.name} has no test images to evaluate on")
    device = torch.device(cfg.device)
    mean, std = dataset.mean_std(device)
    spec = eval_model_spec(cfg, model_name)
    settings = TrainSettings.from_eval(cfg.eval, epochs)
    accs, t0 = [], time.perf_counter()
    for r in range(repeats or cfg.eval.repeats):
        model = train_new(spec, images, labels, dataset, settings, rng.generator(cfg.seed, tag, r),
                          device, progress, desc=f"{tag} {r + 1}/{repeats or cfg.eval.repeats}",
                          soft=soft)
        accs.append(accuracy(model, dataset.test_images, dataset.test_labels, mean, std,
                             cfg.eval.test_batch))
    return {"model": spec[0], "epochs": settings.epochs, "train_images": int(images.shape[0]),
            "accuracies": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "seconds": round(time.perf_counter() - t0, 2), "reported": "last epoch"}


def train_new(spec: tuple[str, dict], images: torch.Tensor, labels: torch.Tensor,
              dataset: Dataset, settings: TrainSettings, generator: torch.Generator,
              device: torch.device | str = "cpu", progress: bool = False, desc: str = "train",
              data_parallel: bool = False,
              on_epoch: Callable[[int, nn.Module], None] | None = None,
              soft: SoftLabels | None = None) -> nn.Module:
    """A fresh network ``spec = (registry name, options)`` for ``dataset``, initialised from
    ``generator`` and trained on ``images``/``labels`` by :func:`train_model`."""
    name, opts = spec
    model = build_model(name, dataset.channels, dataset.num_classes, dataset.image_size,
                        generator=generator, device=torch.device(device), **opts)
    mean, std = dataset.mean_std(torch.device(device))
    return train_model(model, images, labels, settings, mean, std, generator, progress, desc,
                       data_parallel, on_epoch, soft)


def train_scorer(cfg, dataset: Dataset, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator, device, snapshots: int = 0,
                 progress: bool = False) -> tuple[nn.Module, list[dict]]:
    """DASM's scorer f_k: the matching network's architecture trained on the decoded earlier
    segments ``images``/``labels`` by the evaluation protocol for ``dasm.scorer_epochs``.

    Returns the trained network and ``snapshots`` copies of its weights taken at evenly spaced
    epochs (the last one at the end): the warm starts of segment k's matching networks, from
    barely to fully trained on S_<k.
    """
    epochs = cfg.dasm.scorer_epochs
    marks = {max(1, round(epochs * (j + 1) / snapshots)) for j in range(snapshots)}
    saved: list[dict] = []

    def keep(epoch, model):
        if epoch in marks:
            saved.append(host_state(model))

    model = train_new(model_options(cfg.model), images, labels, dataset,
                      TrainSettings.from_eval(cfg.eval, epochs), generator, device, progress,
                      desc="scorer", data_parallel=True, on_epoch=keep)
    return model, saved


def train_conditioned(cfg, dataset: Dataset, images: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator, device, count: int,
                      progress: bool = False) -> list[dict]:
    """The starts of a segment's conditioned matching networks (SeqMatch, PDD): ``count`` fresh
    networks of the matching architecture, each trained ``dasm.condition_epochs`` epochs on the
    decoded earlier segments ``images``/``labels`` by the evaluation protocol. Returns their
    state dicts, on the host (a segment holds ``count`` of them; each outer iteration loads
    one onto the device)."""
    settings = TrainSettings.from_eval(cfg.eval, cfg.dasm.condition_epochs)
    return [host_state(train_new(model_options(cfg.model), images, labels, dataset, settings,
                                 generator, device, progress, desc=f"condition {j + 1}/{count}",
                                 data_parallel=True)) for j in range(count)]


def host_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state dict on the CPU, sharing no storage with the model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def equal_step_epochs(epochs: int, stored: int, decoded: int) -> int:
    """Epochs of a set of ``decoded`` training images (from ``stored`` images per class) that
    give it the SGD steps of a real subset at equal IPC: ``ceil(epochs * stored / decoded)``."""
    return max(1, -(-epochs * stored // decoded))
