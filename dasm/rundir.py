"""The run directory: claim it, check a config against it, write and read its checkpoints.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``
(``segment_NNN.pt``, tensors only), ``grid_seg<k>.png``, ``synthetic.safetensors`` and, after
``dasm evaluate``, ``eval.json``. One config identity (:meth:`Config.identity`) decides both
whether a directory belongs to a config and whether a checkpoint may be resumed from.
"""
from __future__ import annotations

import re
import time
import warnings
import zipfile
from pathlib import Path

import torch

from . import distributed, io, ops, runtime
from .coerce import read_yaml
from .config import Config, from_dict
from .rules import resolve_for
from .data import Dataset, dataset_from_config
from .errors import ConfigError, DasmError, RunDirError
from .matching import check_engine
from .models import model_options, model_skeleton
from .plan import plan
from .synthetic import real_needed, stored_problem
from .window import window_set
from .train import eval_model_spec

CHECKPOINT = re.compile(r"segment_(\d{3,})\.pt")


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
        if not self.config.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no config.yaml)")
        return from_dict(read_yaml(self.config, "run config") or {})

    def last_checkpoint(self) -> int:
        """Number of finished segments recorded (0 if none). Files not named like our
        checkpoints (``segment_NNN.pt``) are ignored."""
        if not self.checkpoints.is_dir():
            return 0
        done = [int(m.group(1)) for p in self.checkpoints.iterdir()
                if (m := CHECKPOINT.fullmatch(p.name))]
        return max(done, default=0)

    def save_checkpoint(self, k: int, state: dict) -> None:
        """Write ``segment_{k}.pt`` (tensors, ints and strings only) and delete the earlier
        ones: resume needs only the newest, which holds the whole set so far."""
        io.torch_save(state, self.checkpoint(k))
        for j in range(1, k):
            self.checkpoint(j).unlink(missing_ok=True)

    def load_checkpoint(self, k: int, identity: str) -> dict:
        """The checkpoint of segment ``k`` (see :func:`load_tensors`); a foreign one is a
        RunDirError."""
        path = self.checkpoint(k)
        state = load_tensors(path, "delete it to recompute that segment")
        if not isinstance(state, dict) or state.get("identity") != identity:
            raise RunDirError(f"checkpoint {path} belongs to another config")
        return state

    def load_segment_checkpoint(self, k: int, identity: str, stored_shape: tuple,
                                n_real: int) -> dict:
        """:meth:`load_checkpoint` of a distillation, with every entry checked: ``stored``
        float of ``stored_shape`` and finite, ``used`` bool ``[n_real]``, a generator state."""
        state = self.load_checkpoint(k, identity)
        path, hint = self.checkpoint(k), "delete it to recompute that segment"
        want = {"stored": (torch.float32, tuple(stored_shape)), "used": (torch.bool, (n_real,)),
                "generator": (torch.uint8, None)}
        for key, (dtype, shape) in want.items():
            t = state.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or \
                    shape is not None and tuple(t.shape) != shape:
                got = "missing" if t is None else (f"{t.dtype} {tuple(t.shape)}" if isinstance(
                    t, torch.Tensor) else type(t).__name__)
                raise RunDirError(f"checkpoint {path}: entry {key!r} is {got}, expected {dtype} "
                                  f"{shape or ''}; {hint}")
        problem = stored_problem(state["stored"])
        if problem:
            raise RunDirError(f"checkpoint {path}: {problem}; {hint}")
        return state


def load_tensors(path: Path, hint: str, map_location="cpu"):
    """``torch.load`` without running code from the file (``weights_only``): tensors, numbers,
    strings and containers. A damaged, truncated or malicious file is one RunDirError naming
    ``path``, its first error line and ``hint``."""
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before it refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file makes torch raise many kinds
        raise RunDirError(f"{path} cannot be read safely ({_load_problem(path, e)}); "
                          f"{hint}") from None


def _load_problem(path: Path, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in whole sentences on one line."""
    text = " ".join(str(e).split())
    if path.is_file() and not zipfile.is_zipfile(path):
        return "not a torch archive: a plain pickle, or a damaged file"
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text)
    if refused:
        return f"it holds more than tensors, numbers and strings: {refused.group(1).rstrip('.')}"
    return text or type(e).__name__


def preflight(cfg: Config, ds: Dataset) -> None:
    """Every check that can fail before a run directory is touched (raises ConfigError)."""
    ops.parse_spec(cfg.backend, "config key 'backend'")
    matching, _ = [model_skeleton(name, ds.channels, ds.num_classes, ds.image_size, **opts)
                   for name, opts in (model_options(cfg.model), eval_model_spec(cfg))]
    check_engine(cfg, matching)
    segments = plan(cfg)
    counts = [len(i) for i in ds.class_index()]
    needs = [real_needed(cfg.synthetic.init, s.ipc, s.factor) for s in segments]
    for c, n in enumerate(counts):
        if sum(needs) > n:
            raise ConfigError(
                f"class {ds.classes[c]!r} has {n} real training images; the inits of all "
                f"{len(segments)} segments ({cfg.synthetic.init}, synthetic.ipc="
                f"{cfg.synthetic.ipc}, factor {cfg.synthetic.factor}) need {sum(needs)} that no "
                f"two inits share")
    for s, need in zip(segments, needs):
        earlier = sum(needs[:s.index])  # at worst every earlier init drew from this pool
        for c, n in enumerate(counts):
            pool, what, keys, values = _pool_bound(cfg, s, n)
            if pool - earlier < max(need, 1):
                raise ConfigError(
                    f"the {what} of segment {s.index + 1} ({keys} {values}) leaves {pool} "
                    f"images of class {ds.classes[c]!r}, of which the earlier inits may take "
                    f"{earlier}: {max(pool - earlier, 0)} for its init ({cfg.synthetic.init}) "
                    f"that needs {need}; lower synthetic.ipc or {keys}")


def _band_size(n: int, easy: float, hard: float) -> int:
    """Images of a class of ``n`` inside the ranks ``[easy, 1 - hard)``, as
    :func:`dasm.scoring.band_pools` cuts them."""
    return n - int(easy * n) - int(hard * n)


def _pool_bound(cfg: Config, s, n: int) -> tuple[int, str, str, str]:
    """Most images of a class of ``n`` that segment ``s``'s pool can hold, what bounds it, its
    keys and their values: the whole class or its difficulty window (dasm.window_*), the
    difficulty band (rank), or the class less its loss tail (lack: its top-up draws from
    outside the tail only); band and tail are taken within the window."""
    d = cfg.dasm
    if window_set(d) and (s.index or d.window_first):
        n = _band_size(n, d.window_easy, d.window_hard)
        if s.full_pool:
            return n, "difficulty window", "dasm.window_easy/window_hard", \
                f"{d.window_easy:g}/{d.window_hard:g}"
    if s.full_pool:
        return n, "pool", "the whole class", ""
    if s.pool == "lack":
        return (n - int(cfg.dasm.tail_drop * n), "lack pool", "dasm.tail_drop",
                f"{cfg.dasm.tail_drop:g}")
    return (_band_size(n, s.easy_drop, s.hard_drop), "difficulty band",
            "dasm.easy_drop/hard_drop", f"{s.easy_drop:g}/{s.hard_drop:g}")


def check_writable(what: str, replaced=(), appended=()) -> None:
    """One RunDirError naming the first file of ``replaced`` (written whole, atomically) or
    ``appended`` (appended to) that cannot be written: checked before any work, so that no
    result is lost for want of a place to put it."""
    for path, append in [(p, False) for p in replaced] + [(p, True) for p in appended]:
        try:
            io.check_writable(path, append)
        except OSError as e:
            raise RunDirError(f"{what}: cannot write {path} ({e.strerror or e}); nothing was "
                              f"done") from None


def claim(run: RunDir, cfg: Config, resume: bool) -> None:
    """Refuse a directory that holds another run (or, resuming, a different config) or one
    where any file of the run cannot be written; write config.yaml into a new one."""
    if run.path.exists() and not run.path.is_dir():
        raise RunDirError(f"--out {run.path} exists and is not a directory")
    if run.config.exists():
        if not resume:
            raise RunDirError(f"{run.path} already holds a run (config.yaml); pass --resume to "
                              f"continue it, or choose another --out")
        saved = run.load_config()
        if saved.identity() != cfg.identity():
            diff = saved.differences(cfg)
            raise RunDirError(f"cannot resume {run.path}: its config differs in "
                              f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}")
    elif resume and run.path.exists() and any(run.path.iterdir()):
        raise RunDirError(f"cannot resume {run.path}: it holds no config.yaml")
    check_writable("--out", [run.config, run.synthetic, run.grid(1), run.checkpoint(1)],
                   [run.metrics])
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.config.exists():
            io.write_text(run.config, cfg.to_yaml())
        for folder in (run.path, run.checkpoints):  # left by a killed write of an earlier try
            io.remove_stale_temporaries(folder)
    except OSError as e:
        raise RunDirError(f"cannot write the run directory {run.path}: "
                          f"{e.strerror or e}") from None


def prepare(cfg: Config, out: str | Path, resume: bool, dataset: Dataset | None = None,
            kind: str = "distill"):
    """Resolve the config against the dataset, apply runtime settings (the backends checked),
    and only then claim ``out``, so that a failed start leaves it as it was.

    Returns ``(cfg, dataset, run, resumed)``. Without ``resume`` a directory that already holds
    a run is refused (nothing is overwritten); with ``resume`` its saved config must have this
    identity, and ``resumed`` is ``(segments done, their checkpoint)`` (``(0, None)`` when none
    finished), checked entry by entry before anything is written.
    """
    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    cfg = resolve_for(cfg, ds)
    preflight(cfg, ds)
    settings = runtime.apply(cfg)  # a forced backend that cannot run here fails before the claim
    ctx = distributed.init_from_env(cfg.dist.backend, cfg.dist.timeout_s)
    run = RunDir(out)
    error = None
    if ctx.is_main:  # rank 0 claims the directory; every rank learns the outcome
        try:
            claim(run, cfg, resume)
        except DasmError as e:
            error = e
    if ctx.any_failed(error is not None):
        raise error or DasmError(f"rank 0 could not claim {run.path} (see its message)")
    resumed = (0, None)
    done = run.last_checkpoint() if resume else 0
    if done:
        resumed = done, run.load_segment_checkpoint(
            done, cfg.identity(), (ds.num_classes, cfg.synthetic.ipc, ds.channels, *ds.image_size),
            ds.train_images.shape[0])
    run.log({"event": "start", "kind": kind, "resume": resume, "identity": cfg.identity(),
             "dataset": ds.name, "train_images": int(ds.train_images.shape[0]), **settings})
    return cfg, ds, run, resumed
