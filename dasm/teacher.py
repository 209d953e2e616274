"""The teacher of soft labels: a network trained on the full real training split by the
evaluation protocol (the full-data line of ``benchmarks/accuracy.py``: same data, protocol and
the generator tagged ``full-data``), with ``eval.teacher_seed`` as its seed and
``eval.teacher_epochs`` (0: ``eval.epochs``) as its epochs. It is the evaluation network itself
unless ``eval.teacher_model`` (a registry name) or ``eval.teacher_width`` (a ConvNet teacher's
width) names a stronger one.

A teacher is named by its identity, :func:`protocol_key` of :func:`teacher_config`: a 16-hex
hash of the config's ``data``, ``model`` and ``eval`` sections and seed (eval keys added after
the first records, at their neutral value, left out), the same key the benchmark gives its
full-data network. It is stored once, as safetensors (weights, and metadata: format, identity,
dataset, network, recipe, test accuracy), at ``eval.teacher`` when that names a file, else in
the cache ``$DASM_TEACHERS/<identity>.safetensors`` (default ``runs/teachers``). A file that
holds another teacher (dataset, network or identity) is refused with one line naming the file
and the difference; a missing one is trained and written there.

Soft labels (``eval.labels``): ``stored``, the teacher's logits on the decoded images kept in the
synthetic set (:func:`relabel`); ``teacher``, every augmented batch relabelled during training.
Either trains with KL at ``eval.temperature`` (:class:`dasm.train.SoftLabels`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from . import io, rng
from .config import IDENTITY_SINCE, SOFT_LABEL_KEYS, Config, identity_view
from .data import Dataset
from .distributed import context
from .errors import ConfigError, DasmError, RunDirError
from .models import build_model, registered
from .synthetic import SyntheticSet
from .train import SoftLabels, TrainSettings, accuracy, eval_model_spec, predict, train_new

FORMAT = "dasm-teacher"
LABEL_KEYS = ("labels", *SOFT_LABEL_KEYS)  # eval.*: every key a label regime reads
REGIMES = ("hard", "stored", "teacher")


def neutral_labels(cfg: Config) -> Config:
    """``cfg`` with every soft-label key at its neutral value (hard labels): the config a set
    is distilled and a full-data network trained under, whatever the labels of its evaluation."""
    return cfg.replace(**{f"eval.{k}": IDENTITY_SINCE[f"eval.{k}"] for k in LABEL_KEYS})


def teacher_config(cfg: Config) -> Config:
    """The config of the network that ``cfg``'s evaluation names as its teacher, trained by the
    evaluation protocol with hard labels: the evaluation network, or ``eval.teacher_model``,
    of width ``eval.teacher_width`` where set (a ConvNet of the ``model`` section only); seed
    ``eval.teacher_seed``, epochs ``eval.teacher_epochs`` (0: ``eval.epochs``). A teacher of
    the evaluation network keeps the identity it had before these keys existed."""
    e = cfg.eval
    over = {"seed": e.teacher_seed, "eval.epochs": e.teacher_epochs or e.epochs}
    if e.teacher_model and e.teacher_model != (e.model or cfg.model.name):
        try:
            registered(e.teacher_model)
        except ConfigError as err:
            raise ConfigError(f"config key 'eval.teacher_model': {err}") from None
        over["eval.model"] = e.teacher_model
    tcfg = neutral_labels(cfg).replace(**over)
    if e.teacher_width:
        name, opts = eval_model_spec(tcfg)
        if "width" not in opts:  # a registry network at its own width: the key would do nothing
            raise ConfigError(f"config key 'eval.teacher_width' sets the width of a ConvNet "
                              f"teacher of the model section; this teacher is {name!r}, built "
                              f"at its registry width (leave the key at 0)")
        tcfg = tcfg.replace(**{"model.width": e.teacher_width})
    return tcfg


def is_evaluation_network(cfg: Config) -> bool:
    """Whether ``cfg``'s teacher is the network its evaluation trains (same registry name and
    options): then the teacher's accuracy is the full-data line."""
    return eval_model_spec(teacher_config(cfg)) == eval_model_spec(cfg)


def _defining(cfg: Config) -> dict:
    """``{data, model, eval, seed}`` of ``cfg`` as identities read them
    (:func:`~dasm.config.identity_view`)."""
    d = cfg.to_dict()
    return identity_view({k: d[k] for k in ("data", "model", "eval", "seed")})


def protocol_key(cfg: Config) -> str:
    """16 hex digits naming the network ``cfg``'s evaluation protocol trains on the full data."""
    return f"{rng.derive_seed(0, json.dumps(_defining(cfg), sort_keys=True)):016x}"


def recipe(cfg: Config) -> dict:
    """The settings behind :func:`protocol_key`, flat (``eval.epochs``, ``seed``, ...)."""
    flat = {}
    for section, value in _defining(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return flat


def cache_dir() -> Path:
    return Path(os.environ.get("DASM_TEACHERS", "runs/teachers"))


def teacher_path(cfg: Config) -> Path:
    """Where ``cfg``'s teacher lives: ``eval.teacher``, else the cache by identity."""
    if cfg.eval.teacher:
        return Path(cfg.eval.teacher)
    return cache_dir() / f"{protocol_key(teacher_config(cfg))}.safetensors"


def full_data_model(cfg: Config, ds: Dataset, epochs: int | None = None,
                    progress: bool = False, desc: str = "full data") -> nn.Module:
    """The evaluation network trained on the whole training set (evaluation protocol, seed
    ``cfg.seed``, generator tagged ``full-data``)."""
    return train_new(eval_model_spec(cfg), ds.train_images, ds.train_labels, ds,
                     TrainSettings.from_eval(cfg.eval, epochs),
                     rng.generator(cfg.seed, "full-data"), cfg.device, progress, desc=desc,
                     data_parallel=True)


def load_or_train(cfg: Config, ds: Dataset, progress: bool = False) -> tuple[nn.Module, dict]:
    """``cfg``'s teacher in eval mode on ``cfg.device``, and its metadata: read from
    :func:`teacher_path` (refused if it is another teacher), else trained and written there."""
    path = teacher_path(cfg)
    if path.exists():
        return load(path, cfg, ds)
    tcfg = teacher_config(cfg)
    try:
        io.check_writable(path)
    except OSError as e:
        raise DasmError(f"teacher: cannot write {e.filename or path}: {e.strerror or e}") from None
    model = full_data_model(tcfg, ds, progress=progress, desc="teacher")
    mean, std = ds.mean_std(torch.device(tcfg.device))
    name, opts = eval_model_spec(tcfg)
    meta = {"format": FORMAT, "identity": protocol_key(tcfg), "dataset": ds.name,
            "classes": str(ds.num_classes), "channels": str(ds.channels),
            "image_size": json.dumps(list(ds.image_size)), "model": name,
            "model_options": json.dumps(opts, sort_keys=True),
            "recipe": json.dumps(recipe(tcfg), sort_keys=True),
            "accuracy": repr(accuracy(model, ds.test_images, ds.test_labels, mean, std)),
            "test_images": str(int(ds.test_images.shape[0]))}
    if context().is_main:
        io.save_safetensors({k: v.detach().cpu().contiguous()
                             for k, v in model.state_dict().items()}, path, meta)
    model.eval()
    return model, {**meta, "path": str(path)}


def load(path: Path, cfg: Config, ds: Dataset) -> tuple[nn.Module, dict]:
    """The teacher of file ``path`` if it is the one ``cfg`` names, for dataset ``ds``."""
    from safetensors import safe_open

    tcfg = teacher_config(cfg)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise RunDirError(f"teacher {path} cannot be read: {' '.join(str(e).split())}") from None
    if meta.get("format") != FORMAT:
        raise RunDirError(f"teacher {path} is not a dasm teacher (format "
                          f"{meta.get('format', 'missing')!r})")
    if meta.get("dataset") != ds.name:
        raise RunDirError(f"teacher {path} was trained on {meta.get('dataset')!r}, this "
                          f"evaluation uses {ds.name!r}")
    name, opts = eval_model_spec(tcfg)
    theirs = (meta.get("model"), meta.get("model_options"))
    if theirs != (name, json.dumps(opts, sort_keys=True)):
        raise RunDirError(f"teacher {path} is a {theirs[0]} {theirs[1]}, this evaluation names "
                          f"a {name} {json.dumps(opts, sort_keys=True)}")
    key = protocol_key(tcfg)
    if meta.get("identity") != key:
        raise RunDirError(f"teacher {path} is teacher {meta.get('identity')}, this config names "
                          f"{key}: {_difference(meta.get('recipe'), recipe(tcfg))}")
    model = build_model(name, ds.channels, ds.num_classes, ds.image_size,
                        generator=torch.Generator(), device=torch.device(tcfg.device), **opts)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"teacher {path} does not fit {name} on {ds.name}: "
                          f"{first[:160]}") from None
    model.eval()
    return model, {**meta, "path": str(path)}


def _difference(saved: str | None, want: dict) -> str:
    """The first setting where a teacher's recorded recipe and the one asked for differ."""
    try:
        have = json.loads(saved or "")
    except json.JSONDecodeError:
        return "its recipe is not recorded"
    if not isinstance(have, dict):
        return "its recipe is not recorded"
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            return f"{k} is {have.get(k, 'absent')!r} there, {want.get(k, 'absent')!r} here"
    return "same recipe, another identity (a file edited by hand?)"


def relabel(sset: SyntheticSet, cfg: Config, ds: Dataset, progress: bool = False) -> SyntheticSet:
    """``sset`` with its soft labels: the logits of ``cfg``'s teacher on its decoded images
    (``[C * decoded_per_class, classes]``, the order of :meth:`SyntheticSet.decoded`), with the
    temperature and the teacher's identity in its metadata."""
    model, meta = load_or_train(cfg, ds, progress)
    device = next(model.parameters()).device
    mean, std = ds.mean_std(device)
    x, _ = sset.decoded()
    logits = predict(model, x, mean, std, cfg.eval.test_batch).cpu()
    extra = {**sset.extra, "soft_temperature": repr(float(cfg.eval.temperature)),
             "teacher": meta["identity"]}
    return SyntheticSet(sset.images, sset.factor, sset.segment_sizes, sset.dataset, sset.classes,
                        sset.mean, sset.std, extra, soft=logits.contiguous())


def soft_labels(cfg: Config, sset: SyntheticSet, ds: Dataset, path: Path,
                progress: bool = False) -> tuple[SoftLabels | None, dict]:
    """The soft targets ``cfg.eval.labels`` asks for (None: hard labels), and what the summary
    records of them. ``stored`` reads the set's own logits (``path``: its file), refused when
    they are absent or from another teacher or temperature than ``cfg`` names."""
    e = cfg.eval
    if e.labels == "hard":
        return None, {"labels": "hard"}
    key = protocol_key(teacher_config(cfg))
    info = {"labels": e.labels, "temperature": e.temperature, "teacher": key}
    if e.labels == "stored":
        if sset.soft is None:
            raise RunDirError(f"{path} holds no soft labels; write them with `dasm relabel "
                              f"{path.parent}` (eval.labels=stored)")
        if sset.extra.get("teacher") != key:
            raise RunDirError(f"{path} holds soft labels of teacher {sset.extra.get('teacher')}, "
                              f"this config names teacher {key}; relabel it")
        stored_t = float(sset.extra.get("soft_temperature", "nan"))
        if stored_t != e.temperature:
            raise RunDirError(f"{path} holds soft labels for temperature {stored_t:g}, this "
                              f"evaluation asks eval.temperature={e.temperature:g}")
        return SoftLabels(e.temperature, logits=sset.soft), info
    model, meta = load_or_train(cfg, ds, progress)
    return SoftLabels(e.temperature, teacher=model), {**info, "teacher_accuracy":
                                                      float(meta["accuracy"])}
