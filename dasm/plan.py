"""What each DASM segment gets: its IPC, factor, pool, matching networks, budget and image step.

Pure functions of the resolved ``synthetic`` / ``match`` / ``dasm`` settings (no tensors), so the
pre-run checks, the schedule, the matcher and the benchmarks read one plan. Segment indices are
0-based; segment 0 is plain IDC (full pool, fresh networks) at its own factor.

**The auto plan reads two axes** (:func:`auto_plan`, applied by :mod:`dasm.rules`):

- *Storage decides the factor.* Multi-formation trades resolution for count: f = 2 stores four
  coarse images in one. It pays while the set is small in absolute terms and its decoded count
  stays a small share of the class: factor 2 iff ``IPC < IPC_FACTOR1`` and
  ``4 * IPC <= DECODED_SHARE * real_per_class``; else 1 (images under 16 px: 1 always, in
  :mod:`dasm.rules`).
- *The kept fraction decides the pools.* ``phi = IPC / real_per_class``: from ``PHI_LARGE`` on,
  later segments draw lack pools (what a network trained on S_<k misses) with fresh networks,
  and, from ``WINDOW_MIN_IPC`` on, every segment draws from the difficulty window that leaves
  out the easiest ``WINDOW_EASY`` of each class (:data:`LARGE_PHI_PLAN`); below ``PHI_LARGE``,
  full pools (IDC's) of the whole class.

Segments: ``auto`` splits IPC >= ``AUTO_MIN_IPC`` into two segments (halves; an odd IPC gives
the first segment the extra image). The numbers behind every constant, and what was tried and
rejected, are in ``docs/experiments.md``; the measured grids are ``results/plan-size-grid.json``
(the factor axis on 300-5000 images per class), ``results/accuracy-cpu-holdout-highipc.md``
(the pools at large phi), ``results/ablation-highipc-switches.json`` (the window) and
``results/plan-window-reach.json`` (where the window pays).

Rank pools are per-class difficulty ranks, easiest first, as fractions ``[lo, hi)`` of the
class: segment ``k >= 1`` of ``K`` leaves out the easiest ``lo_k = easy_drop * k / (K - 1)``
(``schedule: linear``; ``constant``: ``easy_drop``) and the hardest ``hard_drop``; lists give
every segment's value, and segment 0 always takes the full class. Lack pools are built by
:func:`dasm.scoring.lack_pools`.

The image step: ``match.lr_img`` is the step of the largest segment (IDC's rule scales it with
IPC); a smaller segment gets it in proportion to its IPC, divided by its trainable share when
``dasm.step_parity`` is on (:func:`plan`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

AUTO = "auto"
AUTO_MIN_IPC = 20  # segments: auto splits IPCs from here on into AUTO_SEGMENTS segments
AUTO_SEGMENTS = 2
IPC_FACTOR1 = 100  # factor auto: full resolution from this many stored images per class on
DECODED_SHARE = 0.365  # factor auto: 2 only while 4 x IPC decoded images are at most this share
PHI_LARGE = 0.015  # kept fraction IPC / real-per-class from which LARGE_PHI_PLAN applies
WINDOW_EASY = 0.15  # the large-phi plan's window: easiest share of each class left out
WINDOW_MIN_IPC = 500  # ... from this IPC on (it lost at IPC 50-200: results/plan-window-reach.json)
SMALL_PHI_PLAN = {"dasm.pool": "rank", "dasm.match_init": "fresh", "dasm.window_easy": 0.0}
LARGE_PHI_PLAN = {"dasm.pool": "lack", "dasm.match_init": "fresh", "dasm.window_easy": WINDOW_EASY}
LACK_KEYS = ("lack_margin", "tail_drop", "coverage", "lack_fill", "pool_multiple",
             "lack_known")  # keys that shape lack pools only


def segment_sizes(ipc: int, segments) -> list[int]:
    """IPC of each segment. ``segments``: ``auto``, a count K, or per-segment IPCs.

    auto: one segment (plain IDC) below IPC 20, else two segments of ``ceil(ipc / 2)`` and
    ``floor(ipc / 2)`` (few, large segments: each segment pays for a scorer, and small segments
    get small synthetic batches). A count K must divide ``ipc``.
    """
    if segments == AUTO:
        if ipc < AUTO_MIN_IPC:
            return [ipc]
        return [ipc - ipc // AUTO_SEGMENTS * (AUTO_SEGMENTS - 1)] + \
            [ipc // AUTO_SEGMENTS] * (AUTO_SEGMENTS - 1)
    if isinstance(segments, int):
        if ipc % segments:
            raise ConfigError(f"config key 'dasm.segments': {segments} segments do not divide "
                              f"synthetic.ipc={ipc} (give a list of per-segment IPCs instead)")
        return [ipc // segments] * segments
    if sum(segments) != ipc:
        raise ConfigError(f"config key 'dasm.segments': per-segment IPCs {segments} sum to "
                          f"{sum(segments)}, not synthetic.ipc={ipc}")
    return list(segments)


def large_phi(ipc: int, real_per_class: int | None) -> bool:
    """Whether the kept fraction ``ipc / real_per_class`` is in the large-phi regime (None:
    the data's size is unknown, which the rules treat as small)."""
    return bool(real_per_class) and ipc / real_per_class >= PHI_LARGE


def auto_factor(ipc: int, real_per_class: int | None) -> int:
    """Factor 2 while the set is small in storage (``ipc < IPC_FACTOR1``) and its decoded count
    ``4 * ipc`` is at most ``DECODED_SHARE`` of the class; else 1. Unknown class size: the
    storage bound alone."""
    if ipc >= IPC_FACTOR1:
        return 1
    if real_per_class and 4 * ipc > DECODED_SHARE * real_per_class:
        return 1
    return 2


def auto_plan(ipc: int, num_segments: int, real_per_class: int | None) -> dict[str, object]:
    """The ``auto`` values of the plan for images of ordinary size: ``synthetic.factor`` (by
    storage), ``dasm.pool``, ``dasm.match_init`` and ``dasm.window_easy`` (by the kept
    fraction; the window from ``WINDOW_MIN_IPC`` on). One segment is plain IDC whatever phi
    is: full pools, no window."""
    by_phi = LARGE_PHI_PLAN if num_segments > 1 and large_phi(ipc, real_per_class) else \
        SMALL_PHI_PLAN
    window = by_phi["dasm.window_easy"] if ipc >= WINDOW_MIN_IPC else 0.0
    return {"synthetic.factor": auto_factor(ipc, real_per_class), **by_phi,
            "dasm.window_easy": window}


def _values(v) -> list:
    return v if isinstance(v, list) else [v]


def band_set(d) -> bool:
    """Whether the ``dasm`` settings ``d`` (a mapping or the dataclass) ask for a rank band."""
    get = d.get if isinstance(d, dict) else lambda k: getattr(d, k)
    return any(v for key in ("easy_drop", "hard_drop") for v in _values(get(key)))


def check_plan_keys(cfg) -> None:
    """Shape checks of the keys the plan reads (raises ConfigError naming the key)."""
    f, d = cfg.synthetic.factor, cfg.dasm
    if f != AUTO and (isinstance(f, str) or min(_values(f) or [0]) < 1):
        raise ConfigError(f"config key 'synthetic.factor' must be a positive integer, a list of "
                          f"them (one per segment) or 'auto', got {f!r}")
    seg = d.segments
    if isinstance(seg, str) and seg != AUTO or not isinstance(seg, str) and (
            min(_values(seg) or [0]) < 1):
        raise ConfigError(f"config key 'dasm.segments' must be 'auto', a count >= 1 or a list "
                          f"of positive per-segment IPCs, got {seg!r}")
    its = _values(d.iterations)
    if not its or any(i != AUTO if isinstance(i, str) else i < 1 for i in its):
        raise ConfigError(f"config key 'dasm.iterations' must be 'auto', a positive integer or a "
                          f"list of them, got {d.iterations!r}")
    if d.pool == "lack" and band_set(d):
        raise ConfigError("config keys 'dasm.easy_drop'/'dasm.hard_drop' set a rank band, but "
                          "'dasm.pool' is lack (its tail is dasm.tail_drop)")
    if d.pool == "rank":  # the twin: lack-pool keys that a rank pool would silently ignore
        default = {f.name: f.default for f in dataclasses.fields(d)}
        moved = [f"dasm.{key}" for key in LACK_KEYS if getattr(d, key) != default[key]]
        if moved:
            raise ConfigError(f"config key '{moved[0]}' shapes lack pools, but 'dasm.pool' is rank "
                              f"(set dasm.pool: lack or auto, or leave {moved[0]} at its default)")


def _per_segment(value, key: str, k: int, num_segments: int):
    """``value[k]`` of a per-segment list (checked for length), else ``value``."""
    if not isinstance(value, list):
        return value
    if len(value) != num_segments:
        raise ConfigError(f"config key '{key}' lists {len(value)} values for {num_segments} "
                          f"segments")
    return value[k]


def band_for(d, k: int, num_segments: int) -> tuple[float, float]:
    """``(easy_drop, hard_drop)`` of segment ``k`` from the ``dasm`` settings ``d``: the band
    is ranks ``[easy_drop, 1 - hard_drop)``. Segment 0 (and any K = 1 run) takes the full pool;
    a list giving it a band is refused."""
    def pick(value, key, ramp):
        if isinstance(value, list):
            return _per_segment(value, key, k, num_segments)
        if k == 0:
            return 0.0
        if ramp and d.schedule == "linear" and num_segments > 1:
            return value * k / (num_segments - 1)
        return value

    easy = pick(d.easy_drop, "dasm.easy_drop", ramp=True)
    hard = pick(d.hard_drop, "dasm.hard_drop", ramp=False)
    if k == 0 and (easy or hard):
        key = "dasm.easy_drop" if easy else "dasm.hard_drop"
        raise ConfigError(f"config key '{key}' lists {easy if easy else hard} for segment 1, "
                          f"which always takes the full class (give 0 there)")
    if easy + hard >= 1.0:
        raise ConfigError(f"config keys 'dasm.easy_drop' + 'dasm.hard_drop' leave no band at "
                          f"segment {k + 1}: {easy} + {hard} >= 1")
    return easy, hard


def iterations_for(d, match_iterations: int, k: int, num_segments: int) -> int:
    """Outer matching iterations of segment ``k``: ``dasm.iterations`` (a count for every
    segment or a per-segment list), ``auto``: ``match.iterations`` each (equal steps per image)."""
    it = _per_segment(d.iterations, "dasm.iterations", k, num_segments)
    return match_iterations if it == AUTO else it


def synthetic_batch(m, decoded_trainable: int, decoded_frozen: int) -> tuple[int, int]:
    """Decoded images per class in a step's synthetic batch, ``(trainable, frozen)``, from the
    ``match`` settings ``m`` and the decoded images per class of each side."""
    bt = min(m.batch_syn, decoded_trainable)
    bf = decoded_frozen if m.frozen_per_class == 0 else min(m.frozen_per_class, decoded_frozen)
    return bt, bf


@dataclass(frozen=True)
class Segment:
    """One segment of the plan."""

    index: int  # 0-based
    ipc: int  # stored images per class
    start: int  # first slot of the segment in every class's ``n`` slots
    factor: int  # multi-formation factor its images are stored at
    pool: str  # "rank" | "lack"
    easy_drop: float  # rank pools
    hard_drop: float
    match_init: str  # "fresh" | "conditioned" | "scorer" (segment 0: always fresh)
    iterations: int  # outer matching iterations
    batch: tuple[int, int]  # decoded (trainable, frozen) images per class in a synthetic batch
    lr_img: float  # the image step (step parity applied)
    distilled: int = 0  # images per class matching moves (the first ones); the rest stay real

    def __post_init__(self):
        if not self.distilled:
            object.__setattr__(self, "distilled", self.ipc)

    @property
    def decoded(self) -> int:
        """Decoded images per class of this segment."""
        return self.ipc * self.factor ** 2

    @property
    def full_pool(self) -> bool:
        return self.index == 0 or self.pool == "rank" and self.easy_drop == self.hard_drop == 0

    @property
    def needs_scorer(self) -> bool:
        """Whether the segment needs a network trained on S_<k for its pool or its starts."""
        return self.index > 0 and (not self.full_pool or self.match_init == "scorer")

    @property
    def trainable_share(self) -> float:
        bt, bf = self.batch
        return bt / (bt + bf)


def factors(cfg, num_segments: int) -> list[int]:
    """Per-segment factors of a resolved config."""
    f = cfg.synthetic.factor
    if f == AUTO:
        raise ConfigError("config key 'synthetic.factor' is auto: resolve the config first")
    if isinstance(f, list):
        return [int(_per_segment(f, "synthetic.factor", k, num_segments))
                for k in range(num_segments)]
    return [int(f)] * num_segments


def plan(cfg) -> list[Segment]:
    """Every segment of a resolved ``cfg`` (:func:`dasm.rules.resolve`). Raises ConfigError.

    The image step: IDC at any IPC N moves an image, per step and in expectation, by
    lr(N) x P(sampled) / batch = (base N / 10) x (B / (N f^2)) / B = base / (10 f^2). A segment
    of IPC n takes lr(n) = lr_img x n / n_max (``match.lr_img`` is the largest segment's
    step); when its batch holds b_t trainable and b_f frozen decoded images it moves one by
    lr(n) x (b_t / (n f^2)) / (b_t + b_f) = share x base / (10 f^2), share = b_t / (b_t + b_f);
    ``step_parity`` divides lr(n) by the share, restoring IDC's movement.
    """
    d, m = cfg.dasm, cfg.match
    sizes = segment_sizes(cfg.synthetic.ipc, d.segments)
    K = len(sizes)
    fs = factors(cfg, K)
    if AUTO in (d.pool, d.match_init) or isinstance(m.lr_img, str):
        raise ConfigError("the config holds auto values (dasm.pool, dasm.match_init or "
                          "match.lr_img): resolve it first")
    out = []
    for k, size in enumerate(sizes):
        easy, hard = band_for(d, k, K)
        distilled = max(1, math.ceil(d.distill_share * size))  # the rest: kept real images
        frozen = sum(sizes[j] * fs[j] ** 2 for j in range(k)) + (size - distilled) * fs[k] ** 2
        batch = synthetic_batch(m, distilled * fs[k] ** 2, frozen)
        share = batch[0] / (batch[0] + batch[1])
        lr = m.lr_img * distilled / max(sizes)  # IDC's step scales with the images it moves
        out.append(Segment(k, size, sum(sizes[:k]), fs[k], d.pool if k else "rank", easy, hard,
                           d.match_init if k else "fresh",
                           iterations_for(d, m.iterations, k, K), batch,
                           lr / share if d.step_parity else lr, distilled))
    return out


def condition_count(iterations: int, every: int) -> int:
    """Conditioned networks a segment of ``iterations`` outer iterations trains."""
    return math.ceil(iterations / every)
