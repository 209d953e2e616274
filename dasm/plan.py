"""What each DASM segment gets: its IPC, factor, pool, matching networks, budget and image step.

Pure functions of the resolved ``synthetic`` / ``match`` / ``dasm`` settings (no tensors), so the
pre-run checks, the schedule, the matcher and the benchmarks read one plan. Segment indices are
0-based; segment 0 is plain IDC (full pool, fresh networks) at its own factor.

**Alignment with the kept fraction.** ``phi = IPC / real images per class`` (the fraction of the
class a set keeps when every image is stored at full resolution) decides the ``auto`` values
(:func:`auto_plan`, applied by :mod:`dasm.rules`):

==============  ============  ==========  ===================  ============================
phi             factor        pools       matching networks    evidence (held-out split)
==============  ============  ==========  ===================  ============================
< PHI_LARGE     2 (IDC)       rank, full  fresh (IDC)          IPC 50 (phi 0.01): 81.91
                                                               against the large-phi plan's
                                                               81.24; IPC 100 (phi 0.02),
                                                               rank pools: the band and
                                                               scorer warm starts each cost
                                                               1.4 points (results/archive/
                                                               ablation-cpu.md)
>= PHI_LARGE    1             lack (k>1)  fresh                IPC 100 (phi 0.02): 84.25
                                                               against the small-phi plan's
                                                               82.80; IPC 150 (phi 0.03):
                                                               85.91 against 84.14, idc-f1
                                                               85.03; IPC 200 (phi 0.04):
                                                               87.02 against 84.15; idc-f1
                                                               85.77, random 85.50. IPC 500
                                                               (phi 0.1): two
                                                               halves at factor 1 88.57,
                                                               + lack pools 88.75, + lack
                                                               pools and conditioned
                                                               networks 88.35; idc-f1 88.11,
                                                               random 88.32; IPC 1000 (phi
                                                               0.2): 89.47, + lack pools
                                                               89.94, with both pieces
                                                               89.72; idc-f1 89.52, random
                                                               89.81 (one seed)
==============  ============  ==========  ===================  ============================

The held-out ablation behind the large-phi row is ``results/accuracy-cpu-holdout-highipc.md``;
its variants and decision rule were written into ``results/ablation-highipc-plan.json`` before
any ran. The rule (score = mean over IPC 500 and 1000) keeps more pieces only at +0.2: lack pools
alone scored +0.33 over none (+0.18 at 500, +0.47 at 1000), lack pools with conditioned networks
+0.02 (-0.22 at 500, +0.25 at 1000), conditioned networks alone -0.12 (88.43 and 89.37), so
later segments at large phi draw from lack pools with fresh networks (:data:`LARGE_PHI_LATER`);
conditioned networks stay a switch (``dasm.match_init: conditioned``), off by default at every
phi. An uneven split (3/4 + 1/4, both pieces) scored 88.30 and 89.49 (score 88.90, under
both pieces in halves, 89.04, and the plain lack pool, 89.35); a first half at factor 2 (both
pieces) 87.53 and 88.18 (score 87.86); idc at factor 2 85.54 and 85.58, 2.8 and 4.2
under random. One seed.

**Where the regimes meet.** PHI_LARGE was 0.05 (between the measured 0.02 and 0.1) until the
test split showed dasm at IPC 200 (phi 0.033) 1.14 under the best baseline with the small-phi
plan. One held-out point, its rule written first (``results/ablation-phi-200.json``), decided:
at IPC 200 (phi 0.04) the large-phi plan beat the small-phi plan by 2.87 (>= 0.2), so
PHI_LARGE became 0.03, the midpoint between 0.02 and 0.04. A second trial, its rule written
first too (``results/ablation-phi-crossover.json``), ran both plans at phi 0.03 (IPC 150) and
0.02 (IPC 100): the large-phi plan led by 1.77 and 1.45, so PHI_LARGE = 0.015, the midpoint
between 0.01 and 0.02. A third (``results/ablation-phi-50.json``) ran both at phi 0.01 (IPC
50): the small-phi plan led by 0.67 (81.91 against 81.24), so PHI_LARGE stays 0.015 and the
crossover lies between the measured 0.01 and 0.02. One seed at each point.
The test split reports, it did not choose (``results/accuracy-cpu.md``, 2 seeds): the large-phi
plan 84.13 at IPC 100 (idc 83.31, the small-phi plan 83.43), 86.47 at IPC 200 (random 85.25,
idc-f1 85.54, the small-phi plan 84.48), 88.66 at IPC 500 (random 87.91, idc-f1 87.64) and
89.27 at IPC 1000 (random 89.29, idc-f1 88.92). At IPC 1000
four classes of ten have fewer lacking images than the second half needs and are topped up at
random (``topped_up`` in the ``segment_start`` log). Filling them by smallest margin instead
(``dasm.lack_fill: margin``) scored +0.175 over the plain lack pool on the held-out split (88.99
and 90.06 at IPC 500 and 1000), under the 0.2 its pre-written rule asked
(``results/ablation-highipc-fill.json``), and +0.06 with a second seed (mean +0.12,
``results/ablation-highipc-fill-2.json``): a switch, off by default.

Rank pools are per-class difficulty ranks, easiest first, as fractions ``[lo, hi)`` of the
class: segment ``k >= 1`` of ``K`` leaves out the easiest ``lo_k = easy_drop * k / (K - 1)``
(``schedule: linear``; ``constant``: ``easy_drop``) and the hardest ``hard_drop``; lists give
every segment's value. Lack pools are built by :func:`dasm.scoring.lack_pools`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

AUTO = "auto"
AUTO_MIN_IPC = 20  # segments: auto splits IPCs from here on into AUTO_SEGMENTS equal segments
AUTO_SEGMENTS = 2
PHI_LARGE = 0.015  # kept fraction from which the large-phi plan runs (table above)
LARGE_PHI_LATER = {"dasm.pool": "lack", "dasm.match_init": "fresh"}  # later segments there
LACK_KEYS = ("lack_margin", "tail_drop", "coverage", "lack_fill")  # read by lack pools only


def segment_sizes(ipc: int, segments) -> list[int]:
    """IPC of each segment. ``segments``: ``auto``, a count K, or per-segment IPCs.

    auto: one segment (plain IDC) below IPC 20, else two equal halves (few, large segments:
    each segment pays for a scorer, and small segments get small synthetic batches).
    """
    if segments == AUTO:
        segments = AUTO_SEGMENTS if ipc >= AUTO_MIN_IPC and ipc % AUTO_SEGMENTS == 0 else 1
    if isinstance(segments, int):
        if ipc % segments:
            raise ConfigError(f"config key 'dasm.segments': {segments} segments do not divide "
                              f"synthetic.ipc={ipc}")
        return [ipc // segments] * segments
    if sum(segments) != ipc:
        raise ConfigError(f"config key 'dasm.segments': per-segment IPCs {segments} sum to "
                          f"{sum(segments)}, not synthetic.ipc={ipc}")
    return list(segments)


def large_phi(ipc: int, real_per_class: int | None) -> bool:
    """Whether the kept fraction ``ipc / real_per_class`` is in the large-phi regime (None:
    the data's size is unknown, which the rules treat as small)."""
    return bool(real_per_class) and ipc / real_per_class >= PHI_LARGE


def auto_plan(ipc: int, num_segments: int, real_per_class: int | None) -> dict[str, object]:
    """The ``auto`` values of the plan for images of ordinary size: ``synthetic.factor``,
    ``dasm.pool``, ``dasm.match_init`` (the table of the module docstring). One segment has
    no later segment: its pool and networks are IDC's whatever phi is."""
    large = large_phi(ipc, real_per_class)
    later = LARGE_PHI_LATER if num_segments > 1 and large else {}
    return {"synthetic.factor": 1 if large else 2, "dasm.pool": later.get("dasm.pool", "rank"),
            "dasm.match_init": later.get("dasm.match_init", "fresh")}


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
    is ranks ``[easy_drop, 1 - hard_drop)``. Segment 0 (and any K = 1 run) takes the full pool
    unless lists say otherwise."""
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
    of IPC n whose batch holds b_t trainable and b_f frozen decoded images moves one by
    lr(n) x (b_t / (n f^2)) / (b_t + b_f) = share x base / (10 f^2), share = b_t / (b_t + b_f);
    ``step_parity`` divides lr_img by the share, restoring IDC's movement.
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
        frozen = sum(sizes[j] * fs[j] ** 2 for j in range(k))
        batch = synthetic_batch(m, size * fs[k] ** 2, frozen)
        share = batch[0] / (batch[0] + batch[1])
        out.append(Segment(k, size, sum(sizes[:k]), fs[k], d.pool if k else "rank", easy, hard,
                           d.match_init if k else "fresh",
                           iterations_for(d, m.iterations, k, K), batch,
                           m.lr_img * (1.0 / share) if d.step_parity else m.lr_img))
    return out


def condition_count(iterations: int, every: int) -> int:
    """Conditioned networks a segment of ``iterations`` outer iterations trains."""
    return math.ceil(iterations / every)
