"""IDC's ``auto`` rules: what each ``auto`` config value becomes once the dataset is known.

:data:`RULES` is the table, applied top to bottom (a rule may read values resolved above it):

=====================  =================================================================
key                    rule
=====================  =================================================================
device                 cuda when a CUDA device is present, else cpu
model.depth            IDC's 3 ConvNet blocks, fewer where a block would normalise a plane under
                       4x4 (dasm.convnet_depth.auto_depth: 2 on 8x8 digits, where a 2x2 plane made
                       the image step climb the matching loss); left auto for other networks
dasm.segments          what ``segments: auto`` gives (dasm.plan): a count of equal segments,
                       or the per-segment list of an odd IPC (11 + 10)
synthetic.factor       1 for images under 16 px (8x8 digits lose 21 points with 2); else by
                       storage (dasm.plan.auto_factor): 2 (IDC) while IPC < 100 and 4 x IPC is
                       at most DECODED_SHARE (0.365) of the class, else 1
dasm.pool              rank when a band (easy_drop, hard_drop) is set; else rank (full pools)
                       at small phi or K = 1; at large phi dasm.plan.LARGE_PHI_PLAN. Where it
                       resolves to rank, lack-pool keys (dasm.plan.LACK_KEYS) shape nothing and
                       are reset to their defaults, so the saved config says what ran
dasm.match_init        fresh at small phi or K = 1; at large phi dasm.plan.LARGE_PHI_PLAN
dasm.window_easy       0 (no window) at small phi, K = 1 or IPC < 500 (dasm.plan.WINDOW_MIN_IPC);
                       else dasm.plan.WINDOW_EASY (0.15: each class's easiest 15 % by a
                       cross-fitted loss left out)
match.metric           l1 for MNIST-likes, mse otherwise
match.lr_img           1e-4 (MNIST-likes) or 5e-3, x (ipc/10) x (size/base)^2 x lr_img_scale;
                       base 28 for MNIST, 32 otherwise; ipc: the largest segment's
match.augment          color_crop_cutout (siamese DSA)
match.net_augment      match.augment without cutout when CutMix is on
eval.augment           color_crop_cutout_flip_scale_rotate, without cutout when CutMix is on,
                       without flip for digit sets and SVHN
=====================  =================================================================

"MNIST-like" and the size base follow IDC's own table for the datasets it names (MNIST,
Fashion-MNIST, CIFAR-10/100, SVHN). Any other data (an ImageFolder, the 8x8 digits) is ruled by
what it is: grayscale images of at most 32 px get the MNIST rule (l1, 1e-4, base 28), anything
else the CIFAR rule (mse, 5e-3, base 32). So MNIST read from a folder gets MNIST's method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import AUTO, Config, DasmConfig, from_dict
from .convnet_depth import auto_depth
from .data import MNIST_LIKE, NO_FLIP
from .dsa import Strategy
from .errors import ConfigError
from .plan import LACK_KEYS, auto_plan, band_set, segment_sizes


IDC_TABLE = {"mnist": (True, 28), "mnist5k": (True, 28), "fashion-mnist": (True, 32),
             "cifar10": (False, 32), "cifar100": (False, 32), "svhn": (False, 32)}
SMALL_IMAGE = 16  # factor auto: 1 below this many pixels per side
assert set(MNIST_LIKE) == {k for k, (m, _) in IDC_TABLE.items() if m}


@dataclass(frozen=True)
class DataFacts:
    """What the rules know of the dataset."""

    family: str  # registry name without an imagefolder path
    image_size: tuple[int, int]
    channels: int
    cuda: bool
    real_per_class: int | None = None  # fewest training images of a class (None: unknown)

    @property
    def idc_rule(self) -> tuple[bool, int]:
        """``(MNIST-like, size base)``: IDC's table entry, or what the pixels say."""
        if self.family in IDC_TABLE:
            return IDC_TABLE[self.family]
        gray_small = self.channels == 1 and max(self.image_size) <= 32
        return (True, 28) if gray_small else (False, 32)

    @property
    def mnist_like(self) -> bool:
        return self.idc_rule[0]


def _lr_img(d: dict, facts: DataFacts) -> float:
    base = 1e-4 if facts.mnist_like else 5e-3
    size_base = facts.idc_rule[1]
    ipc = max(segment_sizes(d["synthetic"]["ipc"], d["dasm"]["segments"]))
    return base * (ipc / 10) * (facts.image_size[0] / size_base) ** 2 * d["match"]["lr_img_scale"]


def _net_augment(d: dict, facts: DataFacts) -> str:
    match = Strategy.parse(d["match"]["augment"], "match.augment")
    return str(match.without("cutout") if d["match"]["net_cutmix"] > 0 else match)


def _eval_augment(d: dict, facts: DataFacts) -> str:
    st = Strategy.parse("color_crop_cutout_flip_scale_rotate")
    if d["eval"]["cutmix"] > 0:
        st = st.without("cutout")
    if facts.family in NO_FLIP:
        st = st.without("flip")
    return str(st)


def _plan_rule(key: str) -> "Rule":
    def rule(d: dict, facts: DataFacts):
        if key == "synthetic.factor" and min(facts.image_size) < SMALL_IMAGE:
            return 1
        if key == "dasm.pool" and band_set(d["dasm"]):
            return "rank"  # a band was asked for
        K = len(segment_sizes(d["synthetic"]["ipc"], d["dasm"]["segments"]))
        return auto_plan(d["synthetic"]["ipc"], K, facts.real_per_class)[key]
    return rule


def _auto_segments(ipc: int) -> int | list[int]:
    sizes = segment_sizes(ipc, AUTO)
    return len(sizes) if len(set(sizes)) == 1 else sizes


Rule = Callable[[dict, DataFacts], Any]
RULES: list[tuple[str, Rule]] = [
    ("device", lambda d, f: "cuda" if f.cuda else "cpu"),
    ("model.depth", lambda d, f: auto_depth(f.image_size, d["model"]["pooling"])
     if d["model"]["name"] == "convnet" else AUTO),  # another network ignores it
    ("dasm.segments", lambda d, f: _auto_segments(d["synthetic"]["ipc"])),
    ("synthetic.factor", _plan_rule("synthetic.factor")),
    ("dasm.pool", _plan_rule("dasm.pool")),
    ("dasm.match_init", _plan_rule("dasm.match_init")),
    ("dasm.window_easy", _plan_rule("dasm.window_easy")),
    ("match.metric", lambda d, f: "l1" if f.mnist_like else "mse"),
    ("match.lr_img", _lr_img),
    ("match.augment", lambda d, f: "color_crop_cutout"),
    ("match.net_augment", _net_augment),
    ("eval.augment", _eval_augment),
]
STRATEGY_KEYS = ("match.augment", "match.net_augment", "eval.augment")


def _node(d: dict, key: str) -> tuple[dict, str]:
    *path, leaf = key.split(".")
    for part in path:
        d = d[part]
    return d, leaf


def resolve(cfg: Config, dataset_name: str, image_size: tuple[int, int], cuda: bool,
            channels: int = 1, real_per_class: int | None = None) -> Config:
    """``cfg`` with every ``auto`` filled by :data:`RULES`; the result is what a run saves.
    Without ``real_per_class`` the plan's rules take the kept fraction as small."""
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("config key 'device': cuda was asked for but no CUDA device is present")
    facts = DataFacts(dataset_name.split(":", 1)[0], tuple(image_size), channels, cuda,
                      real_per_class)
    d = cfg.to_dict()
    for key, rule in RULES:
        node, leaf = _node(d, key)
        if node[leaf] == AUTO:
            node[leaf] = rule(d, facts)
            if key == "dasm.pool" and node[leaf] == "rank":
                node.update({k: getattr(DasmConfig, k) for k in LACK_KEYS})
    for key in STRATEGY_KEYS:
        node, leaf = _node(d, key)
        Strategy.parse(node[leaf], key)
    return from_dict(d)


def resolve_for(cfg: Config, dataset) -> Config:
    """:func:`resolve` with every fact taken from ``dataset`` (a :class:`~dasm.data.Dataset`)
    and the CUDA devices of this process."""
    import torch

    return resolve(cfg, dataset.name, dataset.image_size, torch.cuda.is_available(),
                   dataset.channels, min(len(i) for i in dataset.class_index()))
