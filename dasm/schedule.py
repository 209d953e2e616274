"""DASM: distil the synthetic set in K segments; each learns what the earlier ones lack.

::

    S_<1 = {}
    for segment k = 1..K (dasm.plan: sizes, bands, budgets):
        k == 1: pool_k = every real image of the class; matching networks start fresh (IDC)
        k >= 2: f_k = the matching architecture trained on decoded S_<k (dasm.scorer_epochs,
                      evaluation protocol), with dasm.warm_starts snapshots of its weights
                d = per-sample difficulty of every real image under f_k (loss | el2n | margin)
                pool_k = per class the ranks [easy_drop_k, 1 - hard_drop) of d, easiest first
                         (easy_drop_k grows with k: the band moves toward the hard end)
                match_init = scorer: outer iteration i of segment k starts its matching network
                         from snapshot i mod warm_starts of f_k (then trains on real data as IDC)
        S_k = init from pool_k (real images no earlier init used)
        distil S_k by IDC matching against pool_k, S_<k frozen on the synthetic side, for the
              segment's iterations; step_parity: lr_img / (trainable share of the synthetic
              batch), so each trainable image moves as far per step as in IDC
        checkpoint (atomic; the generator state included); grid_seg<k>.png
    S = S_1 ∪ … ∪ S_K

K = 1 is plain IDC, bit for bit. ``--resume`` continues after the last finished segment and
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
from .plan import Segment, plan
from .rundir import prepare
from .scoring import band_pools, difficulty, score_dataset
from .synthetic import SyntheticSet, initialise, real_needed, save_grid
from .train import train_scorer


def distill(cfg: Config, out: str | Path, resume: bool = False, dataset: Dataset | None = None,
            progress: bool | None = None) -> SyntheticSet:
    """Run DASM (K = 1: IDC) and write the run directory ``out``. Returns the synthetic set."""
    cfg, ds, run = prepare(cfg, out, resume, dataset)
    ctx = distributed.context()
    progress = (cfg.runtime.progress if progress is None else progress) and ctx.is_main
    device = distributed.device_for(ctx, cfg.device)
    segments = plan(cfg)
    C, f, d = ds.num_classes, cfg.synthetic.factor, cfg.dasm
    stored = torch.zeros(C, cfg.synthetic.ipc, ds.channels, *ds.image_size)  # [C, n, ch, H, W]
    used = torch.zeros(ds.train_images.shape[0], dtype=torch.bool)  # real images an init took
    gen = rng.generator(cfg.seed)
    done = run.last_checkpoint() if resume else 0
    if done:
        ck = run.load_checkpoint(done, cfg.identity())
        stored, used = ck["stored"], ck["used"]
        gen.set_state(ck["generator"])
        run.log({"event": "resume", "segments_done": done})
    class_index = ds.class_index()
    matcher = Matcher(cfg, ds, device, gen, log=run.log, progress=progress)
    for seg in segments[done:]:
        t0 = time.perf_counter()
        earlier = stored[:, :seg.start]
        pools, starts = list(class_index), None
        warm = d.match_init == "scorer"
        if seg.index > 0 and (warm or not seg.full_pool):
            x, y = SyntheticSet(earlier, f, [seg.start]).decoded()
            scorer, snapshots = train_scorer(cfg, ds, x, y, gen, device,
                                             d.warm_starts if warm else 0, progress)
            if not seg.full_pool:
                hardness = difficulty(score_dataset(scorer, ds), d.score)
                pools = band_pools(hardness, class_index, seg.easy_drop, seg.hard_drop, ds.classes)
            starts = snapshots if warm else None
            del scorer
        init = initialise(cfg.synthetic.init, _init_images(ds, pools, used, seg, cfg, gen), C,
                          seg.ipc, ds.channels, ds.image_size, f, gen)
        net_pool = torch.arange(ds.train_images.shape[0]) if d.net_data == "full" \
            else torch.cat(pools)
        # step parity: IDC at any IPC N moves an image, per step and in expectation, by
        # lr(N) x P(sampled) / batch = (base N/10) x (128 / (N f^2)) / 128 = base / (10 f^2).
        # Here lr is the rule at the segment's IPC n and the batch holds n_t trainable + n_f
        # frozen images: lr(n) x (n_t / (n f^2)) / (n_t + n_f) = share x base / (10 f^2), so
        # dividing the step by share = n_t / (n_t + n_f) restores IDC's movement.
        share = matcher.trainable_share(seg.ipc, seg.start)
        lr_scale = 1.0 / share if d.step_parity else 1.0
        run.log({"event": "segment_start", "segment": seg.index, "ipc": seg.ipc,
                 "easy_drop": seg.easy_drop, "hard_drop": seg.hard_drop,
                 "pool_sizes": [len(p) for p in pools], "iterations": seg.iterations,
                 "warm_starts": len(starts or []), "trainable_share": share,
                 "lr_img": cfg.match.lr_img * lr_scale})
        result = matcher.run_segment(init, pools, net_pool, seg.iterations,
                                     cfg.match.inner_steps, frozen=earlier if seg.start else None,
                                     segment=seg.index, lr_scale=lr_scale, starts=starts)
        stored[:, seg.start:seg.start + seg.ipc] = ctx.join_classes(result).cpu()
        if ctx.is_main:
            run.save_checkpoint(seg.index + 1, {"segment": seg.index + 1, "stored": stored,
                                                "used": used, "generator": gen.get_state(),
                                                "identity": cfg.identity()})
            save_grid(stored[:, seg.start:seg.start + seg.ipc], run.grid(seg.index + 1))
        run.log({"event": "segment_done", "segment": seg.index,
                 "seconds": round(time.perf_counter() - t0, 2)})
    sset = SyntheticSet(stored, f, [s.ipc for s in segments], ds.name, ds.classes, ds.mean,
                        ds.std, {"method": "dasm" if len(segments) > 1 else "idc",
                                 "config_identity": cfg.identity(), "seed": cfg.seed})
    if ctx.is_main:
        sset.save(run.synthetic)
    run.log({"event": "done", "segments": len(segments)})
    ctx.barrier()  # outputs are complete before any rank returns
    return sset


def _init_images(ds: Dataset, pools: list[torch.Tensor], used: torch.Tensor, seg: Segment,
                 cfg: Config, gen: torch.Generator) -> torch.Tensor | None:
    """``[C, need, ch, H, W]`` float real images for segment ``seg``'s init: per class a seeded
    draw from its pool among images no earlier init used (marked in ``used``); None if the init
    needs none."""
    need = real_needed(cfg.synthetic.init, seg.ipc, cfg.synthetic.factor)
    if not need:
        return None
    chosen = []
    for c, pool in enumerate(pools):
        free = pool[~used[pool]]
        if len(free) < need:
            raise ConfigError(f"segment {seg.index + 1}: class {ds.classes[c]!r} has {len(free)} "
                              f"real images in its band that no earlier init used; the init "
                              f"needs {need} (narrow dasm.easy_drop/hard_drop)")
        chosen.append(free[torch.randperm(len(free), generator=gen)[:need]])
    pick = torch.stack(chosen)
    used[pick.reshape(-1)] = True
    return to_float(ds.train_images[pick.reshape(-1)]).reshape(len(pools), need, ds.channels,
                                                               *ds.image_size)
