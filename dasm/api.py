"""The operations behind the CLI, callable from Python: evaluate, relabel, export, info,
score."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import io, ops, rng, runtime
from .config import Config
from .data import Dataset, dataset_from_config
from .errors import ConfigError, DasmError, RunDirError, UnsavedResult
from .models import build_model
from .rundir import RunDir, check_writable, load_tensors
from .scoring import score_dataset
from .synthetic import SyntheticSet
from .teacher import relabel as teacher_relabel, soft_labels
from .train import TrainSettings, equal_step_epochs, eval_model_spec, evaluate_images, train_new


def _load_run(run_dir: str | Path, dataset: Dataset | None = None):
    run = RunDir(run_dir)
    cfg = run.load_config()
    sset = SyntheticSet.load(run.synthetic)
    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    sset.check_fits(ds, run.synthetic)
    return run, cfg, sset, ds


def evaluate(run_dir: str | Path, model: str | None = None, epochs: int | None = None,
             repeats: int | None = None, full_data_epochs: int | None = None,
             dataset: Dataset | None = None, progress: bool | None = None,
             overrides: dict | None = None) -> dict:
    """Evaluate a run directory's synthetic set; appends the summary to ``eval.json``."""
    for name, value in (("--epochs", epochs), ("--repeats", repeats),
                        ("--full-data", full_data_epochs)):
        if value is not None and value <= 0:
            raise DasmError(f"evaluate: {name} must be a positive integer, got {value}")
    run, cfg, sset, ds = _load_run(run_dir, dataset)
    cfg = _with_eval_overrides(cfg, overrides, "evaluate")
    evaluations(run)  # a corrupt eval.json stops us before any work
    check_writable("evaluate", [run.evals], [run.metrics])
    runtime.apply(cfg)
    progress = cfg.runtime.progress if progress is None else progress
    x, y = sset.decoded()
    n_epochs = epochs if epochs is not None else cfg.eval.epochs
    if cfg.eval.same_compute:
        n_epochs = equal_step_epochs(n_epochs, sset.ipc, sset.decoded_per_class)
    soft, labels = soft_labels(cfg, sset, ds, run.synthetic, progress)
    summary = evaluate_images(x, y, ds, cfg, model, n_epochs, repeats, progress=progress,
                              soft=soft)
    summary.update(labels)
    summary.update(method=sset.extra.get("method", ""), ipc=sset.ipc, factor=sset.factor,
                   segments=sset.segment_sizes, same_compute=cfg.eval.same_compute,
                   dataset=ds.name, test_images=int(ds.test_images.shape[0]),
                   **_eval_settings(cfg, overrides))
    if full_data_epochs:
        full = evaluate_images(ds.train_images, ds.train_labels, ds, cfg, model, full_data_epochs,
                               repeats, tag="full-data", progress=progress)
        summary["full_data"] = full
    _save_or_keep(summary, run.evals, lambda: (
        _append_evaluation(run, summary),
        run.log({"event": "eval", **{k: v for k, v in summary.items() if k != "full_data"}})))
    return summary


def _append_evaluation(run: RunDir, summary: dict) -> None:
    """Add ``summary`` to eval.json, read again under the run's lock: an evaluation that
    finished while this one trained (another model, another process) is kept, not overwritten."""
    with io.locked_folder(run.path):
        io.write_json(run.evals, {"evaluations": evaluations(run) + [summary]})


def relabel(run_dir: str | Path, overrides: dict | None = None, dataset: Dataset | None = None,
            progress: bool | None = None) -> dict:
    """Write the soft labels of the teacher the run's config (with ``eval.*`` ``overrides``,
    e.g. ``eval.teacher``, ``eval.temperature``) names into its synthetic set: the teacher's
    logits on the decoded images (the teacher is read, or trained and cached, first)."""
    run, cfg, sset, ds = _load_run(run_dir, dataset)
    cfg = _with_eval_overrides(cfg, overrides, "relabel")
    check_writable("relabel", [run.synthetic], [run.metrics])
    runtime.apply(cfg)
    progress = cfg.runtime.progress if progress is None else progress
    labelled = teacher_relabel(sset, cfg, ds, progress)
    labelled.save(run.synthetic)
    done = {"teacher": labelled.extra["teacher"],
            "temperature": float(labelled.extra["soft_temperature"]),
            "soft_labels": list(labelled.soft.shape), "path": str(run.synthetic)}
    run.log({"event": "relabel", **done})
    return done


EVAL_SECTIONS = ("eval", "runtime", "model", "dist")  # --set of evaluate / relabel: these,
EVAL_KEYS = ("seed", "device", "backend")  # and these; the rest made the set and stay the run's


def _with_eval_overrides(cfg: Config, overrides: dict | None, command: str) -> Config:
    """The run's saved config with the ``--set`` overrides of an evaluation: how the set is
    trained on and where. A key that shaped the set or its data (``data.*``, ``synthetic.*``,
    ``match.*``, ``dasm.*``) is refused by name; so is a saved ``device: cuda`` where no CUDA
    device is present (``device=cpu`` evaluates here)."""
    for key in overrides or {}:
        if key not in EVAL_KEYS and key.split(".")[0] not in EVAL_SECTIONS:
            raise ConfigError(f"config key {key!r}: {command} --set takes "
                              f"{', '.join(s + '.*' for s in EVAL_SECTIONS)}, "
                              f"{', '.join(EVAL_KEYS)}; {key} belongs to the run that made the "
                              f"set (distil again to change it)")
    cfg = cfg.replace(**overrides) if overrides else cfg
    cuda = torch.cuda.is_available()
    if cfg.device == "auto":
        cfg = cfg.replace(device="cuda" if cuda else "cpu")
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("config key 'device': the run's config says cuda and no CUDA device "
                          "is present; evaluate here with --set device=cpu")
    return cfg


def _eval_settings(cfg: Config, overrides: dict | None) -> dict:
    """Every setting an evaluation's accuracy depends on besides the set itself: its seed, the
    eval section, the network's config, device and backends, and the ``--set`` overrides."""
    return {"seed": cfg.seed, "eval": dataclasses.asdict(cfg.eval),
            "network": dataclasses.asdict(cfg.model), "device": cfg.device,
            "backend": cfg.backend, "deterministic": cfg.runtime.deterministic,
            "overrides": dict(overrides or {})}


def _save_or_keep(result, path: Path, write) -> None:
    """``write()``; an OSError after the work is an :class:`UnsavedResult` holding ``result``
    and naming ``path``, so that the result is shown rather than lost."""
    try:
        write()
    except OSError as e:
        raise UnsavedResult(f"the result above could not be saved to {e.filename or path}: "
                            f"{e.strerror or e}", result) from None
    except RunDirError as e:  # the file turned corrupt while the work ran
        raise UnsavedResult(f"the result above could not be saved: {e}", result) from None


def evaluations(run: RunDir) -> list[dict]:
    """The evaluations recorded in ``eval.json`` ([] if none); a file that is not ours is an
    error, never silently replaced."""
    if not run.evals.exists():
        return []
    try:
        data = json.loads(run.evals.read_text())
        evaluations = data["evaluations"]
        if not isinstance(evaluations, list):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise RunDirError(f"{run.evals} is corrupt (not a dasm evaluation record); move it away "
                          f"to keep it, then evaluate again") from None
    return evaluations


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def export(run_dir: str | Path, fmt: str, to: str | Path) -> Path:
    """Write what other tools read. ``ddranking``: ``images.pt`` (decoded, normalised,
    class-major ``[N, ch, H, W]`` float32), ``labels.pt`` (``[N]`` int64; a set with soft
    labels: its teacher logits ``[N, classes]`` float32, DD-Ranking's ``soft_labels`` of
    ``soft_label_mode: S``, and the class indices in ``hard_labels.pt``) and ``meta.json``
    (mean, std, classes, ipc, factor, ``normalised: true``, the soft labels' temperature and
    teacher) in folder ``to``; ``imagefolder``:
    ``to/train/<NNN>-<class>/<i>.png`` of the decoded images (8-bit), which
    ``--dataset imagefolder:<to>`` reads back. Refuses to write over existing files."""
    _, _, sset, _ = _load_run(run_dir)  # the checks evaluate makes
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise DasmError(f"export: --to {to} exists and is not a directory")
    check_writable("export", [to] if fmt == "imagefolder" else [to / "images.pt"])
    if fmt == "imagefolder" and sset.soft is not None:
        raise DasmError(f"export: {run_dir} holds soft labels, which an image folder cannot "
                        f"carry; export it as ddranking")
    try:
        return _export(sset, fmt, to)
    except OSError as e:
        raise DasmError(f"export: cannot write {e.filename or to}: {e.strerror or e}") from None


def _write_together(files: dict[str, object], to: Path) -> None:
    """Write ``files`` (name -> tensor, or a dict as JSON) into folder ``to``: all of them into
    a temporary folder inside it first, then moved into place in order; a failed write leaves
    none of them, so a retry is not refused by half an export."""
    to.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=to))
    try:
        for name, obj in files.items():
            if isinstance(obj, dict):
                io.write_json(tmp / name, obj)
            else:
                io.torch_save(obj, tmp / name)
        for name in files:
            (tmp / name).replace(to / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(sset: SyntheticSet, fmt: str, to: Path) -> Path:
    if fmt == "ddranking":
        targets = [to / "images.pt", to / "labels.pt", to / "meta.json"] + \
            ([to / "hard_labels.pt"] if sset.soft is not None else [])
        clash = [p for p in targets if p.exists()]
        if clash:
            raise DasmError(f"export: {clash[0]} exists; choose another --to")
        x, y = sset.decoded(normalize=True)
        files: dict[str, object] = {}  # name -> tensor or meta, written together below
        meta = {  # what a reader needs to use images.pt correctly
            "normalised": True, "mean": list(sset.mean), "std": list(sset.std),
            "classes": sset.classes, "ipc": sset.ipc, "factor": sset.factor,
            "decoded_per_class": sset.decoded_per_class, "layout": "class-major [N, ch, H, W]",
            "dataset": sset.dataset, "labels": "class indices [N] int64"}
        files["images.pt"] = x.cpu().contiguous()
        if sset.soft is None:
            files["labels.pt"] = y.cpu()
        else:  # DD-Ranking reads soft labels as a [N, classes] tensor beside images.pt
            files["labels.pt"] = sset.soft.cpu().contiguous()
            files["hard_labels.pt"] = y.cpu()
            meta.update(labels="teacher logits [N, classes] float32 (soft_label_mode S)",
                        hard_labels="hard_labels.pt: class indices [N] int64",
                        temperature=float(sset.extra["soft_temperature"]),
                        teacher=sset.extra["teacher"])
        files["meta.json"] = meta  # last: a folder with meta.json holds a whole export
        _write_together(files, to)
        return to
    if fmt == "imagefolder":
        from PIL import Image

        if to.exists() and any(to.iterdir()):
            raise DasmError(f"export: {to} exists and is not empty; choose another --to")
        x, y = sset.decoded(normalize=False)
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
        try:
            counts: dict[int, int] = {}
            for img, label in zip(x.clamp(0, 1).cpu(), y.tolist()):
                # train/<NNN>-<class>: the layout imagefolder: reads, classes in label order
                name = _safe_name(sset.classes[label] if sset.classes else str(label))
                folder = tmp / "train" / f"{label:03d}-{name}"
                folder.mkdir(parents=True, exist_ok=True)
                i = counts[label] = counts.get(label, -1) + 1
                arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:05d}.png")
            if to.exists():
                to.rmdir()
            tmp.rename(to)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return to
    raise DasmError(f"export: unknown format {fmt!r} (known: ddranking, imagefolder)")


def info(run_dir: str | Path) -> dict:
    """What a run directory holds: config summary, segments, evaluations, files, backends."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    out = {"path": str(run.path), "dataset": cfg.data.name, "ipc": cfg.synthetic.ipc,
           "factor": cfg.synthetic.factor, "segments": cfg.dasm.segments, "seed": cfg.seed,
           "config_identity": cfg.identity(), "segments_done": run.last_checkpoint(),
           "files": sorted(p.name for p in run.path.iterdir()),
           "backends": ops.backend_table("cpu")}
    _check_newest_checkpoint(run, cfg, out)
    if run.synthetic.exists():
        _, _, sset, _ = _load_run(run.path)  # the checks evaluate makes
        out.update(method=sset.extra.get("method", ""), stored=list(sset.images.shape),
                   decoded=sset.num_classes * sset.decoded_per_class,
                   segment_sizes=sset.segment_sizes)
        if sset.soft is not None:
            out.update(soft_labels={"teacher": sset.extra.get("teacher"),
                                    "temperature": float(sset.extra["soft_temperature"])})
    if run.evals.exists():
        out["evaluations"] = [{k: e.get(k) for k in ("model", "epochs", "mean", "std", "accuracies")}
                              for e in evaluations(run)]
    return out


def _check_newest_checkpoint(run: RunDir, cfg: Config, out: dict) -> None:
    """A newest checkpoint that does not load as this run's counts no finished segment: info
    says so (``checkpoint_problem``) instead of counting it."""
    if out["segments_done"]:
        try:
            run.load_checkpoint(out["segments_done"], cfg.identity())
        except RunDirError as e:
            out.update(segments_done=0, checkpoint_problem=str(e))


def score(cfg: Config, model_from: str | Path, out: str | Path, epochs: int | None = None,
          progress: bool | None = None) -> dict:
    """Per-sample loss/EL2N/margin of every training image of ``cfg.data`` under a network:
    ``model_from/model.pt`` if present, else one trained on ``model_from``'s synthetic set by the
    evaluation protocol (and saved as ``model.pt``). Written to ``out`` (safetensors)."""
    from .rules import resolve_for

    out = Path(out)
    if out.is_dir():
        raise DasmError(f"score: --out {out} is a directory, not a file")
    src = RunDir(model_from)
    ckpt = src.path / "model.pt"
    check_writable("score: --out", [out])
    check_writable("score: --model-from", [] if ckpt.exists() else [ckpt])
    ds = dataset_from_config(cfg.data)
    sset = SyntheticSet.load(src.synthetic) if src.synthetic.exists() else None
    if sset is not None:  # a network trained on another dataset's set scores nothing here
        sset.check_fits(ds, src.synthetic)
    elif not ckpt.exists():
        raise RunDirError(f"score: --model-from {src.path} holds neither model.pt nor "
                          f"synthetic.safetensors")
    cfg = resolve_for(cfg, ds)
    runtime.apply(cfg)
    progress = cfg.runtime.progress if progress is None else progress
    device = torch.device(cfg.device)
    spec = eval_model_spec(cfg)
    settings = TrainSettings.from_eval(cfg.eval, epochs)
    recipe = _recipe(cfg, spec, settings)
    g = rng.generator(cfg.seed, "score")
    unsaved = None
    if ckpt.exists():
        model = _saved_scorer(ckpt, recipe, epochs, spec, ds, g, device)
    else:
        x, y = sset.decoded()
        model = train_new(spec, x, y, ds, settings, g, device, progress, desc="scorer")
        try:
            io.torch_save({"recipe": recipe, "state": model.state_dict()}, ckpt)
        except OSError as e:  # the scores are still written; the note says what was not
            unsaved = f"{e.filename or ckpt}: {e.strerror or e}"
    name = spec[0]
    scores = score_dataset(model, ds)
    tensors = {**{k: v.contiguous() for k, v in scores.items()}, "labels": ds.train_labels.clone()}
    meta = {"dataset": ds.name, "model": name, "source": str(src.path)}
    means = {k: float(v.mean()) for k, v in scores.items()}
    _save_or_keep(means, out, lambda: io.save_safetensors(tensors, out, meta))
    if unsaved:
        raise UnsavedResult(f"the scores were written to {out} but the network could not be "
                            f"saved to {unsaved}", means)
    return means


def _recipe(cfg: Config, spec: tuple[str, dict], s: TrainSettings) -> dict:
    """What a scorer network's weights depend on, saved beside them in ``model.pt``."""
    name, opts = spec
    return {"model": name, **{f"model.{k}": v for k, v in sorted(opts.items())},
            "epochs": s.epochs, "batch": s.batch, "lr": s.lr, "momentum": s.momentum,
            "weight_decay": s.weight_decay, "augment": cfg.eval.augment, "cutmix": s.cutmix,
            "seed": cfg.seed}


def _saved_scorer(ckpt: Path, recipe: dict, epochs: int | None, spec, ds: Dataset, g, device):
    """The network of ``model.pt``, refused when it was trained otherwise than ``recipe`` asks
    (never silently used in place of what was asked)."""
    hint = "delete it to train the scorer again"
    saved = load_tensors(ckpt, hint, device)
    if isinstance(saved, dict) and isinstance(saved.get("recipe"), dict):
        diff = [k for k in recipe if saved["recipe"].get(k) != recipe[k]]
        if diff:
            k = diff[0]
            raise RunDirError(f"{ckpt} was trained with {k}={saved['recipe'].get(k)!r}, this "
                              f"score asks {k}={recipe[k]!r}; {hint} with these settings")
        saved = saved["state"]
    elif epochs is not None:  # a model.pt of an earlier version: how it was trained is unknown
        raise RunDirError(f"{ckpt} records no training settings, so --epochs {epochs} cannot "
                          f"be honoured; {hint}")
    name, opts = spec
    model = build_model(name, ds.channels, ds.num_classes, ds.image_size, generator=g,
                        device=device, **opts)
    try:
        model.load_state_dict(saved)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{ckpt} does not fit model {name} on {ds.name}: "
                          f"{first[:160]}") from None
    return model
