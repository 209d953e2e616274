"""What each DASM segment gets: its IPC, its difficulty band and its matching budget.

Pure functions of the resolved ``dasm`` / ``synthetic`` / ``match`` settings (no tensors), so
the pre-run checks, the schedule and the benchmarks read one plan. Segment indices are 0-based.

Bands are per-class difficulty ranks, easiest first, as fractions ``[lo, hi)`` of the class:
segment 0 takes the whole class; segment ``k >= 1`` of ``K`` leaves out the easiest
``lo_k = easy_drop * k / (K - 1)`` (``schedule: linear``; ``constant``: ``easy_drop``) and the
hardest ``hard_drop`` (outliers, labels that look wrong), so the last segment's band reaches the
hard end. Lists give every segment's value explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

AUTO = "auto"
AUTO_MIN_IPC = 20  # segments: auto splits IPCs from here on into AUTO_SEGMENTS equal segments
AUTO_SEGMENTS = 2


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


@dataclass(frozen=True)
class Segment:
    """One segment of the plan."""

    index: int  # 0-based
    ipc: int  # stored images per class
    start: int  # first slot of the segment in every class's ``n`` slots
    easy_drop: float
    hard_drop: float
    iterations: int  # outer matching iterations

    @property
    def full_pool(self) -> bool:
        return self.easy_drop == 0.0 and self.hard_drop == 0.0


def plan(cfg) -> list[Segment]:
    """Every segment of ``cfg`` (a :class:`~dasm.config.Config`). Raises ConfigError."""
    sizes = segment_sizes(cfg.synthetic.ipc, cfg.dasm.segments)
    K = len(sizes)
    out = []
    for k, size in enumerate(sizes):
        easy, hard = band_for(cfg.dasm, k, K)
        out.append(Segment(k, size, sum(sizes[:k]), easy, hard,
                           iterations_for(cfg.dasm, cfg.match.iterations, k, K)))
    return out
