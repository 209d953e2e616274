"""DASM: distil the synthetic set in K segments; each learns what the earlier ones lack.

::

    S_<1 = {}
    plan (dasm.plan: the factor by storage, the pools by the kept fraction phi): per segment
         its IPC, factor, pool rule, matching networks, budget and image step
    window (dasm.window, when window_easy or window_hard is set): per class, the difficulty
         ranks a cross-fitted network puts inside [window_easy, 1 - window_hard); else the class
    for segment k = 1..K:
        k == 1: pool_k = the window (window_first; else the class); fresh networks (IDC)
        k >= 2, when its pool or networks need one:
                f_k = the matching architecture trained on decoded S_<k (dasm.scorer_epochs)
                pool, inside the window:
                       lack: per class the real images f_k misclassifies or holds with margin
                             < lack_margin (lack_known: and the window's cross-fitted network
                             gets right), minus the hardest tail_drop by loss, plus a seeded
                             coverage share of the rest (topped up to what the init needs:
                             at random, or lack_fill margin: by smallest margin first), and
                             never under pool_multiple x what the init draws
                       rank: the difficulty ranks [easy_drop_k, 1 - hard_drop) (full: 0, 0)
                networks = conditioned: every condition_every outer iterations a fresh network
                             trained condition_epochs on decoded S_<k starts the iteration
                           fresh: IDC's; scorer: snapshots of f_k
        S_k = init from pool_k at factor f_k (real images no earlier init used)
        distil the first distill_share of S_k by IDC matching against pool_k (S_<k and the
              rest of S_k, real images kept as they are, frozen on the synthetic side), for
              the segment's iterations at the plan's image step (step parity)
        checkpoint (atomic; the generator state included); grid_seg<k>.png
    S = S_1 ∪ … ∪ S_K, each segment stored at its own factor

K = 1 is plain IDC, bit for bit, with no window set by hand, ``dasm.distill_share`` 1 and
``dasm.net_data`` full. ``--resume`` continues after the last finished segment and
gives the same set as an uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import distributed, rng
from .config import Config
from .data import Dataset, to_float
from .errors import ConfigError
from .matching import Matcher
from .plan import Segment, condition_count, plan
from .rundir import prepare
from .scoring import band_pools, difficulty, lack_pools, score_dataset
from .synthetic import SyntheticSet, frozen_view, initialise, real_needed, save_grid
from .train import train_conditioned, train_scorer
from .window import class_windows, cross_fitted_scores, needs_cross_fit, window_set


def distill(cfg: Config, out: str | Path, resume: bool = False, dataset: Dataset | None = None,
            progress: bool | None = None) -> SyntheticSet:
    """Run DASM (K = 1: IDC) and write the run directory ``out``. Returns the synthetic set."""
    cfg, ds, run, (done, ck) = prepare(cfg, out, resume, dataset)
    ctx = distributed.context()
    progress = (cfg.runtime.progress if progress is None else progress) and ctx.is_main
    device = distributed.device_for(ctx, cfg.device)
    segments = plan(cfg)
    C, d = ds.num_classes, cfg.dasm
    sizes, factors = [s.ipc for s in segments], [s.factor for s in segments]
    stored = torch.zeros(C, cfg.synthetic.ipc, ds.channels, *ds.image_size)  # [C, n, ch, H, W]
    used = torch.zeros(ds.train_images.shape[0], dtype=torch.bool)  # real images an init took
    gen = rng.generator(cfg.seed)
    if done:
        stored, used = ck["stored"], ck["used"]
        gen.set_state(ck["generator"])
        run.log({"event": "resume", "segments_done": done})
        for seg in segments[:done]:  # a run killed between a checkpoint and its grid
            if ctx.is_main and not run.grid(seg.index + 1).exists():
                save_grid(stored[:, seg.start:seg.start + seg.ipc], run.grid(seg.index + 1))
    matcher = Matcher(cfg, ds, device, gen, log=run.log, progress=progress)
    crossfit = cross_fitted_scores(cfg, ds, device, progress) \
        if needs_cross_fit(d) and segments[done:] else None
    window = class_windows(cfg, ds, crossfit) if segments[done:] else None
    if window is not None and window_set(d):
        run.log({"event": "window", "easy": d.window_easy, "hard": d.window_hard,
                 "sizes": [len(w) for w in window]})
    known = None if crossfit is None or not d.lack_known else crossfit["margin"] > 0
    for seg in segments[done:]:
        t0 = time.perf_counter()
        earlier = stored[:, :seg.start]
        need = real_needed(cfg.synthetic.init, seg.ipc, seg.factor)
        classes = window if seg.index or d.window_first else ds.class_index()
        pools, starts, pool_stats = _pools_and_starts(cfg, ds, seg, earlier, sizes, factors, used,
                                                      need, gen, device, progress, classes, known)
        init = initialise(cfg.synthetic.init, _init_images(ds, pools, used, seg, need, gen), C,
                          seg.ipc, ds.channels, ds.image_size, seg.factor, gen)
        kept = init[:, seg.distilled:]  # selected real images, stored as they are
        net_pool = torch.arange(ds.train_images.shape[0]) if d.net_data == "full" \
            else torch.cat(pools)
        run.log({"event": "segment_start", "segment": seg.index, "ipc": seg.ipc,
                 "factor": seg.factor, "pool": "full" if seg.full_pool else seg.pool,
                 "easy_drop": seg.easy_drop, "hard_drop": seg.hard_drop,
                 "pool_sizes": [len(p) for p in pools], **pool_stats,
                 "iterations": seg.iterations, "match_init": seg.match_init,
                 "network_starts": len({id(s) for s in starts or []}),
                 "distilled": seg.distilled, "trainable_share": seg.trainable_share,
                 "lr_img": seg.lr_img})
        frozen = _frozen_side(earlier, kept, seg, sizes, factors)
        result = matcher.run_segment(init[:, :seg.distilled], pools, net_pool, seg,
                                     frozen=frozen, starts=starts)
        stored[:, seg.start:seg.start + seg.distilled] = ctx.join_classes(result).cpu()
        stored[:, seg.start + seg.distilled:seg.start + seg.ipc] = kept
        if ctx.is_main:
            run.save_checkpoint(seg.index + 1, {"segment": seg.index + 1, "stored": stored,
                                                "used": used, "generator": gen.get_state(),
                                                "identity": cfg.identity()})
            save_grid(stored[:, seg.start:seg.start + seg.ipc], run.grid(seg.index + 1))
        run.log({"event": "segment_done", "segment": seg.index,
                 "seconds": round(time.perf_counter() - t0, 2)})
    sset = SyntheticSet(stored, factors, sizes, ds.name, ds.classes, ds.mean,
                        ds.std, {"method": "dasm" if len(segments) > 1 else "idc",
                                 "config_identity": cfg.identity(), "seed": cfg.seed})
    if ctx.is_main:
        sset.save(run.synthetic)
    run.log({"event": "done", "segments": len(segments)})
    ctx.barrier()  # outputs are complete before any rank returns
    return sset


def _frozen_side(earlier: torch.Tensor, kept: torch.Tensor, seg: Segment, sizes: list[int],
                 factors: list[int]):
    """The constants on segment ``seg``'s synthetic side (:func:`frozen_view`): the earlier
    segments ``earlier`` and the segment's own kept real images ``kept [C, n_kept, ...]``;
    None when there are none."""
    images, ns, fs = [], [], []
    if seg.start:
        images, ns, fs = [earlier], sizes[:seg.index], factors[:seg.index]
    if kept.shape[1]:
        images, ns, fs = images + [kept], ns + [kept.shape[1]], fs + [seg.factor]
    return frozen_view(torch.cat(images, 1), ns, fs) if images else None


def _pools_and_starts(cfg: Config, ds: Dataset, seg: Segment, earlier: torch.Tensor,
                      sizes: list[int], factors: list[int], used: torch.Tensor, need: int,
                      gen: torch.Generator, device, progress: bool,
                      class_index: list[torch.Tensor], known: torch.Tensor | None):
    """Segment ``seg``'s per-class pools, the states its matching networks start from (None:
    fresh) and the pool's statistics for the log. ``earlier``: the stored segments before it;
    ``class_index``: per class, the real images the segment may draw from (its window);
    ``known``: ``[N]`` bool, images a network trained on real data gets right (lack_known)."""
    d = cfg.dasm
    pools, starts, stats = list(class_index), None, {}
    if seg.index == 0 or not (seg.needs_scorer or seg.match_init == "conditioned"):
        return pools, starts, stats
    x, y = SyntheticSet(earlier, factors[:seg.index], sizes[:seg.index]).decoded()
    if seg.needs_scorer:
        warm = seg.match_init == "scorer"
        scorer, snapshots = train_scorer(cfg, ds, x, y, gen, device, d.warm_starts if warm else 0,
                                         progress)
        if not seg.full_pool:
            scores = score_dataset(scorer, ds)
            if seg.pool == "lack":
                pools, stats = lack_pools(scores, class_index, d.lack_margin, d.tail_drop,
                                          d.coverage, need, ~used, gen, d.lack_fill,
                                          d.pool_multiple, known)
            else:
                pools = band_pools(difficulty(scores, d.score), class_index, seg.easy_drop,
                                   seg.hard_drop, ds.classes)
        starts = snapshots if warm else None
    if seg.match_init == "conditioned":
        nets = train_conditioned(cfg, ds, x, y, gen, device,
                                 condition_count(seg.iterations, d.condition_every), progress)
        starts = [nets[i // d.condition_every] for i in range(seg.iterations)]
    return pools, starts, stats


def _init_images(ds: Dataset, pools: list[torch.Tensor], used: torch.Tensor, seg: Segment,
                 need: int, gen: torch.Generator) -> torch.Tensor | None:
    """``[C, need, ch, H, W]`` float real images for segment ``seg``'s init: per class a seeded
    draw from its pool among images no earlier init used (marked in ``used``); None if the init
    needs none."""
    if not need:
        return None
    chosen = []
    for c, pool in enumerate(pools):
        free = pool[~used[pool]]
        if len(free) < need:
            raise ConfigError(f"segment {seg.index + 1}: class {ds.classes[c]!r} has {len(free)} "
                              f"real images in its band that no earlier init used; the init "
                              f"needs {need} (narrow dasm.easy_drop/hard_drop, or lower "
                              f"dasm.tail_drop)")
        chosen.append(free[torch.randperm(len(free), generator=gen)[:need]])
    pick = torch.stack(chosen)
    used[pick.reshape(-1)] = True
    return to_float(ds.train_images[pick.reshape(-1)]).reshape(len(pools), need, ds.channels,
                                                               *ds.image_size)
