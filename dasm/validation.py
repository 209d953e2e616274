"""Range checks of a configuration that need no dataset: counts, fractions, choices the schema
cannot type, and the plan's key shapes. Each failure is one ConfigError naming the key."""
from __future__ import annotations

import functools

from .errors import ConfigError
from .plan import AUTO, check_plan_keys

# Range checks that need no dataset, by dotted key. Counts are > 0; where 0 means something
# (all, auto, off) they are >= 0; fractions (a number or one per segment) lie in [0, 1).
POSITIVE = ("synthetic.ipc", "match.iterations", "match.inner_steps", "match.batch_real",
            "match.batch_syn", "match.net_batch", "match.memory_budget_mb", "match.frozen_chunk",
            "match.log_every", "match.lr_img_scale", "model.width",
            "dasm.scorer_epochs", "dasm.condition_every", "dasm.condition_epochs",
            "dasm.warm_starts", "dasm.window_epochs", "eval.epochs", "eval.batch",
            "eval.repeats", "eval.test_batch", "eval.temperature",
            "dist.timeout_s")
NON_NEGATIVE = ("match.n_data", "match.class_chunk", "match.frozen_per_class",
                "data.train_per_class", "data.holdout_per_class", "data.test_limit",
                "data.image_size", "runtime.threads", "eval.teacher_epochs", "eval.teacher_seed",
                "eval.teacher_width")
FRACTIONS = ("dasm.easy_drop", "dasm.hard_drop", "dasm.tail_drop", "dasm.coverage",
             "dasm.window_easy", "dasm.window_hard")
AUTO_FRACTIONS = ("dasm.window_easy",)  # fractions that may also be auto (the plan's rule)


def _get(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def _interval(cfg, key: str, lo: float, hi: float, closed: bool) -> None:
    v = _get(cfg, key)
    if not (lo <= v <= hi if closed else lo <= v < hi):
        bracket = "]" if closed else ")"
        raise ConfigError(f"config key '{key}' must lie in [{lo:g}, {hi:g}{bracket}, got {v}")


def _positive_or_auto(cfg, key: str, what: str) -> None:
    v = _get(cfg, key)
    if isinstance(v, str) and v != AUTO or not isinstance(v, str) and v <= 0:
        raise ConfigError(f"config key '{key}' must be {what} > 0 or 'auto', got {v!r}")


def validate(cfg) -> None:
    """Range checks that do not need the dataset. Raises ConfigError naming the key."""
    if not 0 <= cfg.seed < 2 ** 63:
        raise ConfigError(f"config key 'seed' must lie in [0, 2^63), got {cfg.seed}")
    for keys, zero_ok in ((POSITIVE, False), (NON_NEGATIVE, True)):
        for key in keys:
            v = _get(cfg, key)
            if v < 0 or (v == 0 and not zero_ok):
                raise ConfigError(f"config key '{key}' must be {'>= 0' if zero_ok else '> 0'}, "
                                  f"got {v}")
    for key in FRACTIONS:
        value = _get(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if v == AUTO and key in AUTO_FRACTIONS:
                continue
            if isinstance(v, str) or not 0.0 <= v < 1.0:
                raise ConfigError(f"config key '{key}' must lie in [0, 1)"
                                  f"{' or be auto' if key in AUTO_FRACTIONS else ''}, got {v!r}")
    if cfg.dasm.window_easy != AUTO and cfg.dasm.window_easy + cfg.dasm.window_hard >= 1:
        raise ConfigError(f"config keys 'dasm.window_easy' + 'dasm.window_hard' leave no window: "
                          f"{cfg.dasm.window_easy} + {cfg.dasm.window_hard} >= 1")
    if not 0 < cfg.dasm.distill_share <= 1:
        raise ConfigError(f"config key 'dasm.distill_share' must lie in (0, 1], got "
                          f"{cfg.dasm.distill_share}")
    if cfg.dasm.pool_multiple < 1:
        raise ConfigError(f"config key 'dasm.pool_multiple' must be >= 1 (the pool holds at least "
                          f"the images its init draws), got {cfg.dasm.pool_multiple}")
    _interval(cfg, "match.mom_img", 0.0, 1.0, closed=False)
    _interval(cfg, "match.net_cutmix", 0.0, 1.0, closed=True)
    _interval(cfg, "eval.cutmix", 0.0, 1.0, closed=True)
    _positive_or_auto(cfg, "model.depth", "a count")
    _positive_or_auto(cfg, "match.lr_img", "a number")
    if cfg.data.channels not in (0, 1, 3):
        raise ConfigError(f"config key 'data.channels' must be 0 (auto), 1 or 3, "
                          f"got {cfg.data.channels}")
    check_plan_keys(cfg)
