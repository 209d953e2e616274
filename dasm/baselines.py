"""Real-subset baselines at a given IPC, stored as synthetic sets (factor 1) so that they are
evaluated by exactly the same protocol.

random   a seeded random draw per class
easy     the lowest-loss images per class under a network trained on the full training set
hard     the highest-loss images per class under that network
herding  greedy herding (Welling 2009) in that network's penultimate feature space
window   a seeded random draw per class from the difficulty window (dasm.window_easy /
         window_hard, :mod:`dasm.window`): the coreset DASM's window alone gives
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from . import rng, teacher
from .config import Config
from .data import Dataset, dataset_from_config, normalize, to_float
from .distributed import context
from .errors import ConfigError
from .rules import resolve_for
from .scoring import score_dataset
from .synthetic import SyntheticSet
from .window import class_windows, cross_fitted_scores, window_set

METHODS = ("random", "easy", "hard", "herding", "window")


def subset_set(ds: Dataset, picks: list[torch.Tensor], method: str, seed: int) -> SyntheticSet:
    """A factor-1 synthetic set holding the real images ``picks[c]`` of each class."""
    images = torch.stack([to_float(ds.train_images[p]) for p in picks])
    return SyntheticSet(images, 1, [images.shape[1]], ds.name, ds.classes, ds.mean, ds.std,
                        {"method": method, "seed": seed})


def random_picks(ds: Dataset, ipc: int, generator: torch.Generator,
                 classes: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per class, ``ipc`` indices drawn without replacement from ``classes[c]`` (default: the
    whole class)."""
    return [idx[torch.randperm(len(idx), generator=generator)[:ipc]]
            for idx in (classes or ds.class_index())]


def full_data_model(cfg: Config, ds: Dataset, epochs: int | None = None,
                    progress: bool = False) -> nn.Module:
    """The evaluation network trained on the whole training set (evaluation protocol): the
    run a teacher of soft labels is (:mod:`dasm.teacher`)."""
    return teacher.full_data_model(cfg, ds, epochs, progress)


def loss_picks(ds: Dataset, ipc: int, model: nn.Module, hardest: bool) -> list[torch.Tensor]:
    loss = score_dataset(model, ds)["loss"]
    picks = []
    for idx in ds.class_index():
        order = torch.argsort(loss[idx], stable=True, descending=hardest)
        picks.append(idx[order[:ipc]])
    return picks


@torch.no_grad()
def herding_picks(ds: Dataset, ipc: int, model: nn.Module) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    mean, std = ds.mean_std(device)
    if not hasattr(model, "embed"):
        raise ConfigError("herding needs a model with an embed() method")
    model.eval()
    picks = []
    for idx in ds.class_index():
        feats = []
        for lo in range(0, len(idx), 1000):
            x = to_float(ds.train_images[idx[lo:lo + 1000]].to(device))
            feats.append(model.embed(normalize(x, mean, std)).float())
        phi = torch.cat(feats)
        mu = phi.mean(0)
        chosen, running = [], torch.zeros_like(mu)
        available = torch.ones(len(idx), dtype=torch.bool, device=device)
        for t in range(1, min(ipc, len(idx)) + 1):
            dist = ((mu - (running + phi) / t) ** 2).sum(1)
            dist[~available] = float("inf")
            i = int(dist.argmin())
            chosen.append(i)
            available[i] = False
            running += phi[i]
        picks.append(idx[torch.tensor(chosen)])
    model.train()
    return picks


def select_subset(method: str, cfg: Config, ds: Dataset, reference_model: nn.Module | None = None,
             epochs: int | None = None, progress: bool = False) -> SyntheticSet:
    """The ``method`` subset at ``cfg.synthetic.ipc``; ``reference_model``: a full-data network
    (trained here when needed and not given)."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r} (known: {', '.join(METHODS)})")
    ipc = cfg.synthetic.ipc
    small = [ds.classes[c] for c, idx in enumerate(ds.class_index()) if len(idx) < ipc]
    if small:
        raise ConfigError(f"synthetic.ipc={ipc} exceeds the training images of class {small[0]!r}")
    if method == "random":
        return subset_set(ds, random_picks(ds, ipc, rng.generator(cfg.seed, "random")), method,
                          cfg.seed)
    if method == "window":
        if not window_set(cfg.dasm):
            raise ConfigError("baseline 'window' needs a window: set dasm.window_easy or "
                              "dasm.window_hard (the plan picks one only at large kept fractions "
                              "from IPC 500)")
        windows = class_windows(cfg, ds, cross_fitted_scores(cfg, ds, cfg.device, progress))
        short = [ds.classes[c] for c, w in enumerate(windows) if len(w) < ipc]
        if short:
            raise ConfigError(f"synthetic.ipc={ipc} exceeds the window of class {short[0]!r}")
        return subset_set(ds, random_picks(ds, ipc, rng.generator(cfg.seed, "random"), windows),
                          method, cfg.seed)
    model = reference_model or full_data_model(cfg, ds, epochs, progress)
    picks = herding_picks(ds, ipc, model) if method == "herding" else \
        loss_picks(ds, ipc, model, hardest=method == "hard")
    return subset_set(ds, picks, method, cfg.seed)


def run_baseline(method: str, cfg: Config, out: str | Path, dataset: Dataset | None = None,
                 reference_model: nn.Module | None = None, epochs: int | None = None,
                 progress: bool | None = None) -> SyntheticSet:
    """:func:`select_subset` written as a run directory (config.yaml, synthetic.safetensors, grid)."""
    from .rundir import prepare
    from .synthetic import save_grid

    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    if method == "window":  # the plan's window for this IPC and these segments, made explicit
        planned = resolve_for(cfg, ds).dasm  # (resolved with one segment, auto means none)
        cfg = cfg.replace(**{"dasm.window_easy": planned.window_easy,
                             "dasm.window_hard": planned.window_hard})
    cfg = cfg.replace(**{"synthetic.factor": 1, "dasm.segments": 1})  # real images, one segment
    cfg, ds, run, _ = prepare(cfg, out, resume=False, dataset=ds, kind=f"baseline-{method}")
    progress = cfg.runtime.progress if progress is None else progress
    sset = select_subset(method, cfg, ds, reference_model, epochs, progress)
    if context().is_main:
        sset.save(run.synthetic)
        save_grid(sset.images, run.grid(1))
    run.log({"event": "done", "method": method, "ipc": cfg.synthetic.ipc})
    return sset

