"""Min/max bucket downsampling of metric series for charts.

A series of S steps is cut into at most N equal-width step buckets; each bucket reports its first
step, mean, min and max (and how many points it holds). Plotting the mean with a min–max band
keeps a one-step loss spike visible at any zoom level, which plain striding or averaging hides.
The database does the bucketing (``GROUP BY (step - lo) / width``) so a 1M-point job never
travels to Python; :func:`downsample_minmax` is the same rule in pure Python, used for small
in-memory series and as the oracle in tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


def bucket_width(step_min: int, step_max: int, max_points: int) -> int:
    """Smallest integer width so that ``[step_min, step_max]`` fits in ``max_points`` buckets."""
    if max_points < 1:
        raise ValueError("max_points must be >= 1")
    span = step_max - step_min + 1
    return max(1, math.ceil(span / max_points))


@dataclass(frozen=True)
class Bucket:
    step: int
    mean: float | None
    min: float | None
    max: float | None
    count: int


def downsample_minmax(
    points: Iterable[tuple[int, float | None]],
    max_points: int,
    *,
    step_min: int | None = None,
    step_max: int | None = None,
) -> list[Bucket]:
    """Bucket ``(step, value)`` pairs exactly as the SQL path does (None values are skipped
    in mean/min/max but counted in ``count``)."""
    pts = sorted(points)
    if not pts:
        return []
    lo = pts[0][0] if step_min is None else step_min
    hi = pts[-1][0] if step_max is None else step_max
    width = bucket_width(lo, hi, max_points)
    buckets: dict[int, list[tuple[int, float | None]]] = {}
    for step, value in pts:
        buckets.setdefault((step - lo) // width, []).append((step, value))
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
