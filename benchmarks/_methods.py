"""What each method of the accuracy protocol runs: its config overrides of the profile
(:data:`METHODS`), the real-subset baselines' settings (:data:`SUBSETS`), a run's config, and a
line that describes it in every table (:func:`describe`)."""
from __future__ import annotations

from pathlib import Path

import yaml

from dasm.coerce import parse_overrides, with_overrides
from dasm.config import from_dict
from dasm.plan import iterations_for, segment_sizes

# method -> config overrides of a distilled run (None: a real-subset baseline). Every table
# lists what each method it shows runs (:func:`describe`), so a name needs no history.
# The ablations from before the plan had a window (2026-12-07) keep none, so a rerun measures
# what their rule measured.
NO_WINDOW = {"dasm.window_easy": 0.0}
BAND_SCORER = {"dasm.match_init": "scorer", "dasm.easy_drop": 0.5, "dasm.hard_drop": 0.02,
               "dasm.pool": "rank", "synthetic.factor": 2,
               **NO_WINDOW}  # a rank band + scorer warm starts
F1 = {"synthetic.factor": 1, **NO_WINDOW}
METHODS = {
    "random": None,
    "idc": {"dasm.segments": 1, "synthetic.factor": 2},  # IDC as published (factor 2)
    "idc-f1": {"dasm.segments": 1, "synthetic.factor": 1},  # IDC-I: full-resolution images
    "idc-compute": {"dasm.segments": 1},  # dasm's first-segment factor; iterations: dasm's total
    "dasm": {},  # the package's defaults (the plan of dasm.plan)
    # two halves at factor 1 with each piece of the large-phi plan alone, and all together
    "dasm-f1": {**F1, "dasm.pool": "rank", "dasm.match_init": "fresh"},
    "dasm-lack": {**F1, "dasm.pool": "lack", "dasm.match_init": "fresh"},
    "dasm-cond": {**F1, "dasm.pool": "rank", "dasm.match_init": "conditioned"},
    "dasm-all": {**F1, "dasm.pool": "lack", "dasm.match_init": "conditioned"},
    "dasm-mixed": {"synthetic.factor": [2, 1], "dasm.pool": "lack",
                   "dasm.match_init": "conditioned", **NO_WINDOW},
    "dasm-split": {**F1, "dasm.pool": "lack", "dasm.match_init": "conditioned"},  # 3/4 + 1/4
    "dasm-fill": {**F1, "dasm.pool": "lack", "dasm.match_init": "fresh",
                  "dasm.lack_fill": "margin"},
    "dasm-f2": {"synthetic.factor": 2, "dasm.pool": "rank", "dasm.match_init": "fresh",
                **NO_WINDOW},
    "dasm-factor2": {"synthetic.factor": 2},  # the plan's pools and networks, at factor 2
    "dasm-design": BAND_SCORER,
    "dasm-fresh": {**BAND_SCORER, "dasm.match_init": "fresh"},
    "dasm-no-band": {**BAND_SCORER, "dasm.easy_drop": 0.0, "dasm.hard_drop": 0.0},
    "dasm-no-parity": {**BAND_SCORER, "dasm.step_parity": False},
    "dasm-k3": {"dasm.segments": 3},  # three segments (IPC divisible by 3: near-equal list)
    # the high-IPC switches (results/ablation-highipc-switches.json): a difficulty window cut
    # by a cross-fitted network (the easiest 30 % or 15 %, or the hardest 10 %, of each class;
    # for every segment, or later segments only), the window alone as a real coreset, lack
    # candidates a real-data network knows (CCFS), and a partial update (20 % distilled)
    "dasm-window-easy30": {"dasm.window_easy": 0.3},
    "dasm-window-easy30-later": {"dasm.window_easy": 0.3, "dasm.window_first": False},
    "dasm-window-easy15": {"dasm.window_easy": 0.15},
    "dasm-no-window": NO_WINDOW,  # the plan without its window (results/plan-window-reach.json)
    "dasm-window-hard10": {"dasm.window_hard": 0.1},
    "dasm-known": {"dasm.lack_known": True},
    "dasm-distill20": {"dasm.distill_share": 0.2},
    "dasm-distill50": {"dasm.distill_share": 0.5},  # results/ablation-partial-update.json
    # how far matching moves the images at high IPC (results/ablation-highipc-lr.json): the
    # profile's image learning rate (lr_img_scale 30, chosen at IPC 10) x3 and x10
    "dasm-lr90": {"match.lr_img_scale": 90},
    "dasm-lr300": {"match.lr_img_scale": 300},
    # IDC-I with its images held where they start (a step too small to move them): the init
    # draw alone, matched for the same compute (results/digits-draw.json)
    "idc-f1-frozen": {"dasm.segments": 1, "synthetic.factor": 1, "match.lr_img_scale": 1e-9},
    # four segments instead of the auto plan's two (results/ablation-segments.json)
    "dasm-seg4": {"dasm.segments": 4},
    "window-easy30": None,
    "window-easy15": None,  # the large-phi plan's window alone (dasm.plan.WINDOW_EASY)
    "easy": None,
    "hard": None,
}
# real-subset baselines: (baselines.METHODS name, settings)
SUBSETS = {"window-easy30": ("window", {"dasm.window_easy": 0.3}),
           "window-easy15": ("window", {"dasm.window_easy": 0.15})}


def subset_of(method: str) -> tuple[str, dict]:
    """A real-subset method's ``(dasm.baselines method, config overrides)``."""
    return SUBSETS.get(method, (method, {}))
CONTENDERS = ("random", "idc", "idc-f1", "idc-compute", "dasm")
BASELINES = ("random", "idc", "idc-f1")  # dasm is compared with the best of them


def load_profile(path: str, overrides: list[str], holdout: bool):
    """``(Config, benchmark settings)`` of a profile file; ``holdout`` tests on held-out images."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    bench = raw.pop("benchmark", {}) or {}
    extra = parse_overrides(overrides)
    if holdout:  # an explicit --set data.holdout_per_class wins (small sets: digits)
        extra.setdefault("data.holdout_per_class", bench.get("holdout_per_class", 1000))
    return from_dict(with_overrides(raw, extra)), bench


def run_config(base, method: str, ipc: int, seed: int):
    """The config of ``method`` at ``ipc`` and distillation ``seed``."""
    cfg = base.replace(**{"synthetic.ipc": ipc, "seed": seed})
    over = dict(METHODS[method] or subset_of(method)[1])
    if method == "dasm-k3":
        over["dasm.segments"] = [ipc - 2 * (ipc // 3), ipc // 3, ipc // 3]
    if method == "dasm-split":
        over["dasm.segments"] = [ipc - ipc // 4, ipc // 4]
    if method == "idc-compute":
        K = len(segment_sizes(ipc, cfg.dasm.segments))
        over["match.iterations"] = sum(iterations_for(cfg.dasm, cfg.match.iterations, k, K)
                                       for k in range(K))
    return cfg.replace(**over)


RUN_CONFIG_NOTES = {"dasm-split": "segments 3/4 + 1/4", "dasm-k3": "three near-equal segments",
                    "idc-compute": "matching steps: the whole dasm run's"}


def describe(method: str) -> str:
    """What ``method`` runs, in settings: its overrides of the profile, or the subset it draws."""
    if METHODS[method] is None:
        base, over = subset_of(method)
        what = {"random": "a seeded random real subset", "easy": "the lowest-loss real images",
                "hard": "the highest-loss real images", "window": "a seeded random real subset "
                "of the difficulty window"}.get(base, base)
        return what + "".join(f", {k}={v}" for k, v in over.items())
    parts = [f"{k}={v}" for k, v in METHODS[method].items()]
    parts += [RUN_CONFIG_NOTES[method]] if method in RUN_CONFIG_NOTES else []
    return ", ".join(parts) or "the package's defaults"


def budget_of(method: str) -> str:
    return "equal-compute" if method == "idc-compute" else "equal-steps"
