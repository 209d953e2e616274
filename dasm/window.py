"""The difficulty window: the real images of each class a run draws from, its ends measured by
a cross-fitted network (each image scored by a network that never saw it).

Every class is split in two seeded halves; a network of the matching architecture trains
``dasm.window_epochs`` on one half of every class (the evaluation protocol) and scores the
other, and the other way round. Per class, the window is the difficulty ranks
``[window_easy, 1 - window_hard)`` of that loss (easiest first): ``window_easy`` cuts redundant
easy images, ``window_hard`` outliers and doubtful labels. The same scores say which images a
network trained on real data gets right (margin > 0): ``dasm.lack_known`` keeps only those among
a lack pool's lacking images (CCFS's candidates).
"""
from __future__ import annotations

import torch

from . import rng
from .data import Dataset
from .models import model_options
from .scoring import SCORES, band_pools, score_images
from .train import TrainSettings, train_new


def window_set(d) -> bool:
    """Whether the ``dasm`` settings ``d`` ask for a window."""
    return bool(d.window_easy or d.window_hard)


def cross_fitted_scores(cfg, ds: Dataset, device, progress: bool = False) -> dict:
    """``{"loss", "el2n", "margin"} -> [N]`` float32: every training image scored by the
    network trained on the half of its class it is not in. Seeded by ``cfg.seed`` alone
    (``rng.generator(seed, "window")``), so a resumed run measures the same window."""
    gen = rng.generator(cfg.seed, "window")
    halves = [[], []]
    for idx in ds.class_index():
        perm = idx[torch.randperm(len(idx), generator=gen)]
        halves[0].append(perm[:len(idx) // 2])
        halves[1].append(perm[len(idx) // 2:])
    halves = [torch.cat(h) for h in halves]
    settings = TrainSettings.from_eval(cfg.eval, cfg.dasm.window_epochs)
    n = ds.train_images.shape[0]
    out = {k: torch.empty(n) for k in SCORES}
    mean, std = ds.mean_std(torch.device(device))
    # Every rank trains both networks whole (not data-parallel): the window is a discrete cut
    # of ranks, and a sharded sum's rounding moves images across its edge, so a window under
    # torch.distributed would differ from one process's.
    for j, (fit, held) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
        net = train_new(model_options(cfg.model), ds.train_images[fit], ds.train_labels[fit],
                        ds, settings, gen, device, progress, desc=f"window {j + 1}/2")
        for k, v in score_images(net, ds.train_images[held], ds.train_labels[held], mean,
                                 std).items():
            out[k][held] = v
    return out


def needs_cross_fit(d) -> bool:
    """Whether the ``dasm`` settings ``d`` read the cross-fitted scores (a window, or lack
    candidates the real-data network must know)."""
    return window_set(d) or d.lack_known


def class_windows(cfg, ds: Dataset, scores: dict | None) -> list[torch.Tensor]:
    """Per class, the training indices inside the window (ascending by cross-fitted loss,
    ``scores`` from :func:`cross_fitted_scores`); the whole class when no window is set."""
    d = cfg.dasm
    if not window_set(d):
        return ds.class_index()
    return band_pools(scores["loss"], ds.class_index(), d.window_easy, d.window_hard,
                      ds.classes)
