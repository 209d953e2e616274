"""One dataclass tree for every run: loaded from YAML, overridden by ``--set key=value``,
validated up front (a bad value is one :class:`ConfigError` naming the key), saved resolved.

``"auto"`` values are filled by :func:`dasm.rules.resolve` once the dataset is known (IDC's
rules), so the ``config.yaml`` of a run directory holds only concrete values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Union

import yaml

from .coerce import build_dataclass, parse_overrides, read_yaml, with_overrides
from .errors import ConfigError
from .plan import AUTO, LACK_KEYS
from .validation import FRACTIONS, NON_NEGATIVE, POSITIVE, validate  # noqa: F401 (re-exported)


def _choice(default, *choices):
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # a registered name, or imagefolder:/path
    root: str = "data"  # torchvision layout; Fashion-MNIST falls back to the Debian folder
    download: bool = False
    train_per_class: int = 0  # 0: all; n: a seeded subset of n training images per class
    holdout_per_class: int = 0  # n > 0: hold n train images per class out and test on them
    test_limit: int = 0  # 0: the whole test split; n: its first n images (smoke runs)
    split_seed: int = 0  # seed of the subset/holdout draws (part of the dataset's definition)
    channels: int = 0  # imagefolder: 0 = colour if any image is colour, else 1; or 1 / 3
    image_size: int = 0  # imagefolder: 0 = the most common size; n = resize to n x n


@dataclass
class ModelConfig:
    name: str = "convnet"
    depth: Union[int, str] = AUTO  # auto: 3 blocks, fewer under 16 px (convnet_depth.auto_depth)
    width: int = 128
    norm: str = _choice("instance", "instance", "batch", "none")
    pooling: str = _choice("avg", "avg", "max", "none")
    act: str = _choice("relu", "relu", "leakyrelu", "sigmoid")


@dataclass
class SyntheticConfig:
    ipc: int = 10  # stored images per class
    # multi-formation tiles per side: an integer, one per segment (a list), or auto (dasm.plan:
    # by the kept fraction; 1 below 16 px)
    factor: Union[int, str, List[int]] = AUTO
    init: str = _choice("mix", "mix", "real", "noise")


@dataclass
class MatchConfig:
    iterations: int = 500  # outer iterations, a freshly initialised network each
    inner_steps: int = 100  # matching steps per outer iteration
    metric: str = _choice(AUTO, AUTO, "l1", "mse", "cos")
    lr_img: Union[float, str] = AUTO  # auto: IDC's base rate x (ipc/10) x (size/base)^2
    lr_img_scale: float = 1.0  # multiplies an auto lr_img (short budgets want larger steps)
    mom_img: float = 0.5
    image_update: str = _choice("sequential", "sequential", "joint")
    batch_real: int = 64
    batch_syn: int = 128  # decoded trainable images per class per step (sampled)
    match_bias: bool = False
    match_fc: bool = False
    augment: str = AUTO  # siamese DSA strategy; auto: color_crop_cutout (IDC)
    n_data: int = 500  # real samples the network trains on after each matching step
    net_batch: int = 64
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    net_cutmix: float = 0.5  # CutMix probability of the network update
    net_augment: str = AUTO  # per-sample DSA of the network update; auto: matching minus cutout
    engine: str = _choice("batched", "batched", "loop")
    class_batching: str = _choice(AUTO, AUTO, "vmap", "sequential")
    class_chunk: int = 0  # classes per graph chunk; 0: chosen from memory_budget_mb
    memory_budget_mb: int = 4096
    frozen_per_class: int = 128  # decoded frozen images per class per step; 0: all of them
    frozen_chunk: int = 256  # images per graph-free gradient chunk of frozen segments
    log_every: int = 10  # outer iterations between metrics lines


@dataclass
class DasmConfig:
    segments: Union[int, str, List[int]] = AUTO  # auto: 1 below IPC 20, else 2 halves; K; a list
    # pools of segments k >= 2 (auto: dasm.plan's rule by the kept fraction): rank = the band
    # [easy_drop, 1 - hard_drop) of difficulty ranks (the full class when both are 0); lack = what
    # a network trained on S_<k gets wrong or holds with a small margin, minus the hardest tail,
    # plus a random coverage share of the rest
    pool: str = _choice(AUTO, AUTO, "rank", "lack")
    score: str = _choice("loss", "loss", "el2n", "margin")  # rank pools: the difficulty
    easy_drop: Union[float, List[float]] = 0.0  # rank pools: easiest ranks left out by the last
    hard_drop: Union[float, List[float]] = 0.0  # rank pools: hardest ranks left out, k >= 2
    schedule: str = _choice("linear", "linear", "constant")  # how easy_drop grows over k
    lack_margin: float = 1.0  # lack pools: true logit minus best other below this = lacking
    tail_drop: float = 0.05  # lack pools: hardest fraction of each class by loss left out
    coverage: float = 0.3  # lack pools: share of the pool drawn at random from the rest
    # lack pools, a class with too few lacking images: random = topped up at random; margin =
    # the rest's smallest margins count as lacking until they are (1 - coverage) of the init
    lack_fill: str = _choice("random", "random", "margin")
    # lack pools: the pool holds at least this many times the images the segment's init draws
    # (or the whole class without its tail), so real batches never come only from the init
    pool_multiple: float = 2.0
    # the difficulty window (dasm.window): per class, ranks [window_easy, 1 - window_hard) of the
    # loss under a cross-fitted network (window_epochs on the other half of the class) bound
    # every pool and init; window_first: segment 1 draws from it too (else later segments only);
    # window_easy auto: dasm.plan's rule (0.15 at large kept fractions from IPC 500, else none)
    window_easy: Union[float, str] = AUTO
    window_hard: float = 0.0
    window_epochs: int = 8
    window_first: bool = True
    # lack pools: only lacking images the window's cross-fitted network gets right (CCFS)
    lack_known: bool = False
    # partial update (SelMatch): per segment, this share of the images is distilled; the rest
    # are selected real images stored as they are (frozen on the synthetic side)
    distill_share: float = 1.0
    scorer_epochs: int = 300
    # matching networks of k >= 2 (auto: dasm.plan's rule): fresh (IDC); conditioned = a fresh
    # network trained condition_epochs on decoded S_<k, a new one every condition_every outer
    # iterations (SeqMatch, PDD); scorer = snapshots of the scorer
    match_init: str = _choice(AUTO, AUTO, "fresh", "conditioned", "scorer")
    condition_every: int = 2  # outer iterations per conditioned network
    condition_epochs: int = 5  # epochs each conditioned network trains on decoded S_<k
    warm_starts: int = 4  # scorer snapshots (evenly spaced epochs) the outer iterations cycle
    step_parity: bool = True  # lr_img / trainable share: each image moves as far as in IDC
    iterations: Union[int, str, List[int]] = AUTO  # outer iterations per segment; auto: match's
    net_data: str = _choice("full", "full", "pool")  # real data of the matching network's updates


@dataclass
class EvalConfig:
    model: str = ""  # "": the matching network's config; else a registry name
    epochs: int = 1000
    batch: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = AUTO  # per-sample DSA; auto: color_crop_cutout_flip_scale_rotate, adjusted
    cutmix: float = 0.5
    repeats: int = 3
    same_compute: bool = False  # epochs / factor^2 for decoded sets (equal SGD steps)
    test_batch: int = 500
    # soft labels (dasm.teacher): hard, stored (the set's teacher logits), teacher (every
    # augmented batch relabelled); KL at temperature (x T^2). The teacher: a network trained on
    # the full training split, of teacher_seed, teacher_epochs (0: epochs), cached by identity,
    # or the file eval.teacher; the evaluation network unless teacher_model / teacher_width
    labels: str = _choice("hard", "hard", "stored", "teacher")
    temperature: float = 4.0
    teacher: str = ""
    teacher_epochs: int = 0
    teacher_seed: int = 0
    teacher_model: str = ""  # "": the evaluation network; else a registry name
    teacher_width: int = 0  # a ConvNet teacher's width; 0: the evaluation network's


@dataclass
class RuntimeConfig:
    threads: int = 0  # torch intra-op threads; 0: torch's default
    cpu_allocator: str = _choice("tuned", "tuned", "default")
    progress: bool = True
    deterministic: bool = False


@dataclass
class DistConfig:
    timeout_s: int = 600  # a rank that does not answer in this time fails the run
    backend: str = _choice(AUTO, AUTO, "gloo", "nccl")


@dataclass
class Config:
    seed: int = 0
    device: str = _choice(AUTO, AUTO, "cpu", "cuda")
    backend: str = AUTO  # auto, one backend for every op, or per op "grad_distance=triton,..."
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    dasm: DasmConfig = field(default_factory=DasmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def identity(self) -> str:
        """Stable 12-hex hash of what defines a run's result: every section but ``runtime`` and
        ``dist`` (threads, progress bars, timeouts do not change the synthetic set). One hash
        serves to refuse a foreign run directory and to accept a checkpoint."""
        d = {k: v for k, v in self.to_dict().items() if k not in IDENTITY_EXCLUDES}
        if d["dasm"]["pool"] == "rank":  # keys that shape lack pools only shape nothing here
            for key in LACK_KEYS:
                d["dasm"].pop(key)
        if d["eval"]["labels"] == "hard":  # nor do the soft-label keys under hard labels
            for key in SOFT_LABEL_KEYS:
                d["eval"].pop(key)
        return hashlib.sha256(json.dumps(identity_view(d), sort_keys=True).encode()).hexdigest()[:12]

    def differences(self, other: "Config") -> list[str]:
        """Dotted keys where two configs differ in their identity sections."""
        fa, fb = _flat(self.to_dict()), _flat(other.to_dict())
        skip = tuple(s + "." for s in IDENTITY_EXCLUDES)
        keys = {k for k in fa.keys() | fb.keys() if not k.startswith(skip)} - set(LOCATION_KEYS)
        return sorted(k for k in keys if fa.get(k) != fb.get(k))

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted-key overrides applied and validated."""
        return from_dict(with_overrides(self.to_dict(), overrides))


IDENTITY_EXCLUDES = ("runtime", "dist")
SOFT_LABEL_KEYS = ("temperature", "teacher", "teacher_epochs", "teacher_seed", "teacher_model",
                   "teacher_width")  # eval.*
# Keys added after results were first recorded, with the value that reproduces the behaviour from
# before they existed. At that value a key is left out of the identity, so a record made before
# it existed keeps its identity (and a sweep reuses it); any other value enters the hash.
IDENTITY_SINCE = {"dasm.pool": "rank", "dasm.lack_margin": 1.0, "dasm.tail_drop": 0.05,
                  "dasm.coverage": 0.3, "dasm.condition_every": 2, "dasm.condition_epochs": 5,
                  "dasm.lack_fill": "random", "dasm.pool_multiple": 1.0,
                  "dasm.window_easy": 0.0, "dasm.window_hard": 0.0, "dasm.window_epochs": 8,
                  "dasm.window_first": True, "dasm.lack_known": False,
                  "dasm.distill_share": 1.0, "eval.labels": "hard", "eval.temperature": 4.0,
                  "eval.teacher": "", "eval.teacher_epochs": 0, "eval.teacher_seed": 0,
                  "eval.teacher_model": "", "eval.teacher_width": 0}
# where the data lies and whether it may be fetched, not what it is: an identity reads them at
# these values, so a run resumes, and a teacher is found, from another data root
LOCATION_KEYS = {"data.root": "data", "data.download": False}


def identity_view(d: dict) -> dict:
    """The sections ``d`` (a config's dict, or some of its sections) as identities read them:
    the keys added later dropped at their neutral values (:data:`IDENTITY_SINCE`: an identity
    computed before they existed is unchanged) and the :data:`LOCATION_KEYS` at theirs."""
    for key, neutral in IDENTITY_SINCE.items():
        section, leaf = key.split(".")
        if section in d and d[section].get(leaf) == neutral:
            del d[section][leaf]
    for key, value in LOCATION_KEYS.items():
        section, leaf = key.split(".")
        if section in d:
            d[section][leaf] = value
    return d


BENCHMARK_SECTION = "benchmark"  # in profile files: the benchmark's settings, ignored by runs


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- ``extra`` (dotted keys from CLI flags) <- ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p, "config file") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        # a profile's benchmark section configures benchmarks/accuracy.py, not a run
        if not isinstance(data.pop(BENCHMARK_SECTION, {}) or {}, dict):
            raise ConfigError(f"config file {p}: '{BENCHMARK_SECTION}' must be a mapping")
    merged = dict(extra or {})
    merged.update(parse_overrides(overrides))
    return from_dict(with_overrides(data, merged))
