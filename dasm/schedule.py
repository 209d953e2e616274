"""DASM: distil the synthetic set in K segments, each from a difficulty window of the real set.

::

    for k in 1..K:
        k == 1: pool = every real image of the class
        k >= 2: train a scorer on S_1..S_{k-1} (evaluation protocol, dasm.scorer_epochs epochs),
                score every real image (loss | el2n | margin), keep per class the ranks in
                [easy_drop_k, 1 - hard_drop_k] (easiest first)
        S_k = init from the pool (real images no earlier init used), distilled by IDC matching
              against the pool with S_1..S_{k-1} frozen on the synthetic side
        checkpoint (atomic); grid_seg<k>.png

K = 1 is plain IDC. ``--resume`` continues after the last finished segment and gives the same
set as an uninterrupted run (the generator state is part of the checkpoint).

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
``grid_seg<k>.png`` and, when done, ``synthetic.safetensors``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import distributed, io, rng, runtime
from .config import Config, from_dict, resolve, same_run, segment_sizes, window_for
from .data import Dataset, dataset_from_config, to_float
from .errors import ConfigError, DasmError, RunDirError
from .matching import Matcher, check_engine
from .models import build_model, model_options, model_skeleton
from .scoring import difficulty, score_dataset, window_pools
from .synthetic import SyntheticSet, initialise, real_needed, save_grid
from .train import TrainSettings, eval_model_spec, train_model


class RunDir:
    """Paths and writers of a run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    synthetic = property(lambda self: self.path / "synthetic.safetensors")
    evals = property(lambda self: self.path / "eval.json")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def checkpoint(self, k: int) -> Path:
        return self.checkpoints / f"segment_{k:03d}.pt"

    def grid(self, k: int) -> Path:
        return self.path / f"grid_seg{k}.png"

    def log(self, record: dict) -> None:
        if distributed.context().is_main:  # rank 0 alone writes
            io.append_jsonl(self.metrics, {"time": round(time.time(), 3), **record})

    def load_config(self) -> Config:
        import yaml

        if not self.config.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no config.yaml)")
        try:
            return from_dict(yaml.safe_load(self.config.read_text()) or {})
        except yaml.YAMLError as e:
            raise RunDirError(f"{self.config} is not valid YAML: {e}") from None

    def last_checkpoint(self) -> int:
        """Number of finished segments recorded (0 if none)."""
        done = [int(p.stem.split("_")[1]) for p in self.checkpoints.glob("segment_*.pt")]
        return max(done, default=0)


def preflight(cfg: Config, ds: Dataset) -> None:
    """Every check that can fail before a run directory is touched (raises ConfigError)."""
    for name, opts in (model_options(cfg.model), eval_model_spec(cfg)):
        model_skeleton(name, ds.channels, ds.num_classes, ds.image_size, **opts)
    check_engine(cfg)
    sizes = segment_sizes(cfg)
    counts = [len(i) for i in ds.class_index()]
    for k, size in enumerate(sizes):
        need = real_needed(cfg.synthetic.init, size, cfg.synthetic.factor)
        easy, hard = window_for(cfg, k, len(sizes))
        for c, n in enumerate(counts):
            pool = n - int(easy * n) - int(hard * n)
            if pool < max(need, 1):
                raise ConfigError(
                    f"the difficulty window of segment {k + 1} (easy_drop={easy:g}, "
                    f"hard_drop={hard:g}) leaves {pool} images of class {ds.classes[c]!r}; its "
                    f"init ({cfg.synthetic.init}) needs {need}")


def claim_run_dir(run: RunDir, cfg: Config, resume: bool) -> None:
    """Refuse a directory that holds another run (or, resuming, a different config); write
    config.yaml into a new one."""
    if run.config.exists():
        if not resume:
            raise RunDirError(f"{run.path} already holds a run (config.yaml); pass --resume to "
                              f"continue it, or choose another --out")
        diff = same_run(run.load_config(), cfg)
        if diff:
            raise RunDirError(f"cannot resume {run.path}: its config differs in "
                              f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}")
    elif resume and run.path.exists() and any(run.path.iterdir()):
        raise RunDirError(f"cannot resume {run.path}: it holds no config.yaml")
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.config.exists():
        io.write_text(run.config, cfg.to_yaml())


def prepare_run(cfg: Config, out: str | Path, resume: bool, dataset: Dataset | None = None,
                kind: str = "distill"):
    """Resolve the config against the dataset, apply runtime settings, and claim ``out``.

    Without ``resume`` a directory that already holds a run is refused (nothing is
    overwritten); with ``resume`` its saved config must equal this one.
    """
    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    cfg = resolve(cfg, ds.name, ds.image_size, torch.cuda.is_available())
    preflight(cfg, ds)
    ctx = distributed.init_from_env(cfg.dist.backend, cfg.dist.timeout_s)
    run = RunDir(out)
    error = None
    if ctx.is_main:  # rank 0 claims the directory; every rank learns the outcome
        try:
            claim_run_dir(run, cfg, resume)
        except DasmError as e:
            error = e
    if ctx.any_failed(error is not None):
        raise error or DasmError(f"rank 0 could not claim {run.path} (see its message)")
    settings = runtime.apply(cfg)
    run.log({"event": "start", "kind": kind, "resume": resume, "config_digest": cfg.digest(),
             "dataset": ds.name, "train_images": int(ds.train_images.shape[0]), **settings})
    return cfg, ds, run


def train_scorer(cfg: Config, ds: Dataset, stored: torch.Tensor, factor: int,
                 generator: torch.Generator, progress: bool):
    """A network trained on the decoded set ``stored [C, n, ch, H, W]`` (evaluation protocol)."""
    device = torch.device(cfg.device)
    x, y = SyntheticSet(stored, factor, [stored.shape[1]]).decoded()
    name, opts = eval_model_spec(cfg)
    model = build_model(name, ds.channels, ds.num_classes, ds.image_size, generator=generator,
                        device=device, **opts)
    mean, std = ds.mean_std(device)
    settings = TrainSettings.from_eval(cfg.eval, cfg.dasm.scorer_epochs)
    return train_model(model, x, y, settings, mean, std, generator, progress, desc="scorer",
                       data_parallel=True)


def distill(cfg: Config, out: str | Path, resume: bool = False, dataset: Dataset | None = None,
            progress: bool | None = None) -> SyntheticSet:
    """Run DASM (K = 1: IDC) and write the run directory ``out``. Returns the synthetic set."""
    cfg, ds, run = prepare_run(cfg, out, resume, dataset)
    ctx = distributed.context()
    progress = (cfg.runtime.progress if progress is None else progress) and ctx.is_main
    device = distributed.device_for(ctx, cfg.device)
    sizes = segment_sizes(cfg)
    K, C, f = len(sizes), ds.num_classes, cfg.synthetic.factor
    ipc, ch, size = cfg.synthetic.ipc, ds.channels, ds.image_size
    stored = torch.zeros(C, ipc, ch, *size)
    used = torch.zeros(ds.train_images.shape[0], dtype=torch.bool)
    gen = rng.generator(cfg.seed)
    start = run.last_checkpoint() if resume else 0
    if start:
        ck = torch.load(run.checkpoint(start), weights_only=False)
        if ck.get("digest") != cfg.digest():
            raise RunDirError(f"checkpoint {run.checkpoint(start)} belongs to another config")
        stored, used = ck["stored"], ck["used"]
        gen.set_state(ck["generator"])
        run.log({"event": "resume", "segments_done": start})
    class_index = ds.class_index()
    matcher = Matcher(cfg, ds, device, gen, log=run.log, progress=progress)
    for k in range(start, K):
        t0 = time.perf_counter()
        done = sum(sizes[:k])
        easy, hard = window_for(cfg, k, K)
        if easy == 0.0 and hard == 0.0:  # full pool: no scorer needed
            pools = list(class_index)
        else:
            scorer = train_scorer(cfg, ds, stored[:, :done], f, gen, progress)
            hardness = difficulty(score_dataset(scorer, ds), cfg.dasm.score)
            pools = window_pools(hardness, class_index, easy, hard, ds.classes)
            del scorer
        # init from images of the pool that no earlier init used
        need = real_needed(cfg.synthetic.init, sizes[k], f)
        chosen = []
        for c, pool in enumerate(pools):
            free = pool[~used[pool]]
            if len(free) < need:
                raise ConfigError(f"segment {k + 1}: class {ds.classes[c]!r} has {len(free)} real "
                                  f"images in its window that no earlier init used; the init "
                                  f"needs {need} (widen dasm.easy_drop/hard_drop)")
            chosen.append(free[torch.randperm(len(free), generator=gen)[:need]])
        real = None
        if need:
            pick = torch.stack(chosen)
            used[pick.reshape(-1)] = True
            real = to_float(ds.train_images[pick.reshape(-1)]).reshape(C, need, ch, *size)
        init = initialise(cfg.synthetic.init, real, C, sizes[k], ch, size, f, gen)
        net_pool = torch.arange(ds.train_images.shape[0]) if cfg.dasm.net_data == "full" \
            else torch.cat(pools)
        run.log({"event": "segment_start", "segment": k, "ipc": sizes[k], "easy_drop": easy,
                 "hard_drop": hard, "pool_sizes": [len(p) for p in pools]})
        frozen = stored[:, :done] if done else None
        # frozen images dilute each trainable image's share of the synthetic gradient; scaling
        # the step by 1/share keeps IDC's per-image step size at this segment's IPC
        share = matcher.trainable_share(sizes[k], done)
        lr_scale = 1.0 / share if cfg.dasm.frozen_lr_compensation else 1.0
        run.log({"event": "segment_lr", "segment": k, "trainable_share": share,
                 "lr_img": cfg.match.lr_img * lr_scale})
        result = matcher.distill(init, pools, net_pool, cfg.match.iterations, cfg.match.inner_steps,
                                 frozen=frozen, segment=k, lr_scale=lr_scale)
        stored[:, done:done + sizes[k]] = ctx.join_classes(result).cpu()
        if ctx.is_main:
            io.torch_save({"segment": k + 1, "stored": stored, "used": used,
                           "generator": gen.get_state(), "digest": cfg.digest()},
                          run.checkpoint(k + 1))
            save_grid(stored[:, done:done + sizes[k]], run.grid(k + 1))
        run.log({"event": "segment_done", "segment": k,
                 "seconds": round(time.perf_counter() - t0, 2)})
    sset = SyntheticSet(stored, f, sizes, ds.name, ds.classes, ds.mean, ds.std,
                        {"method": "dasm" if K > 1 else "idc", "config_digest": cfg.digest(),
                         "seed": cfg.seed})
    if ctx.is_main:
        sset.save(run.synthetic)
    run.log({"event": "done", "segments": K})
    ctx.barrier()  # outputs are complete before any rank returns
    return sset
