"""Min/max bucket downsampling of metric series for charts.

A series is cut into step buckets ``bucket = step // width`` (aligned at step 0, so buckets of a
narrower width nest exactly inside wider ones) with the smallest width that gives at most N
buckets over the requested steps; each bucket reports its first step, mean, min and max and how
many points it holds. Plotting the mean with a min–max band keeps a one-step loss spike visible
at any zoom level, which plain striding or averaging hides.

The database does the bucketing (``GROUP BY step / width``), from the raw points or, for runs that
have ended, from pre-bucketed rollups at widths 4, 16, 64, … (``server.crud.rollups``): a read of a
1M-point job then aggregates a few thousand rollup rows instead of a million points. Rollups store
sums and counts, so a rollup-based bucket is exactly the bucket computed from the raw points.
:func:`downsample_minmax` is the same rule in pure Python, used as the oracle in tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Rollup widths (each 4x the previous); reads use the widest one that divides the bucket width.
ROLLUP_WIDTHS = (4, 16, 64, 256, 1024, 4096)


def bucket_count(step_min: int, step_max: int, width: int) -> int:
    return step_max // width - step_min // width + 1


def bucket_width(step_min: int, step_max: int, max_points: int, multiple_of: int = 1) -> int:
    """Smallest multiple of ``multiple_of`` whose aligned buckets cover ``[step_min, step_max]`` in at
    most ``max_points`` buckets."""
    if max_points < 1:
        raise ValueError("max_points must be >= 1")
    span = step_max - step_min + 1
    width = max(1, math.ceil(span / max_points))
    width = -(-width // multiple_of) * multiple_of
    while bucket_count(step_min, step_max, width) > max_points:
        width += multiple_of
    return width


def rollup_plan(step_min: int, step_max: int, max_points: int) -> tuple[int, int] | None:
    """``(rollup width, bucket width)`` for a rollup-based read, or None when raw points are as cheap
    (the finest bucket width is below the narrowest rollup)."""
    finest = bucket_width(step_min, step_max, max_points)
    usable = [w for w in ROLLUP_WIDTHS if w <= finest]
    if not usable:
        return None
    width = bucket_width(step_min, step_max, max_points, multiple_of=usable[-1])
    # the widest rollup level that divides the width: fewer rows to combine, identical buckets
    return max(w for w in ROLLUP_WIDTHS if width % w == 0), width


@dataclass(frozen=True)
class Bucket:
    step: int
    mean: float | None
    min: float | None
    max: float | None
    count: int


def downsample_minmax(points: Iterable[tuple[int, float | None]], width: int) -> list[Bucket]:
    """Bucket ``(step, value)`` pairs exactly as the SQL path does (None/NaN values are skipped in
    mean/min/max but counted in ``count``)."""
    buckets: dict[int, list[tuple[int, float | None]]] = {}
    for step, value in sorted(points):
        buckets.setdefault(step // width, []).append((step, value))
    out = []
    for key in sorted(buckets):
        members = buckets[key]
        values = [v for _, v in members if v is not None and not math.isnan(v)]
        out.append(
            Bucket(
                step=members[0][0],
                mean=sum(values) / len(values) if values else None,
                min=min(values) if values else None,
                max=max(values) if values else None,
                count=len(members),
            )
        )
    return out


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: a diverged value becomes null (CSV exports keep it verbatim)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
