"""Speed-up over the baseline as data efficiency: pure functions, no database, no worker.

The baseline's winner is trained at several budgets (1×, 2×, 4× the tokens by default); that gives
a curve *final validation loss vs tokens*. An optimizer's **token speed-up** is the number of
tokens the baseline needs to reach that optimizer's final validation loss, read off the curve by
linear interpolation in log-tokens between the two measured budgets that bracket it, divided by the
tokens the optimizer used. The **time speed-up** is the same with the runs' own training seconds
on the x-axis instead of tokens.

Outside the measured range nothing is extrapolated: a loss lower than the baseline's best gives a
lower bound (``> 4×``: the baseline did not get there even with its largest budget), a loss higher
than the baseline's at its smallest budget an upper bound (``< 1×``).

Non-monotone baseline curves (a larger budget ending *worse*, e.g. noise or an over-long schedule)
are replaced by their running minimum before interpolating: the baseline is credited with the
best loss it reached at any budget up to that one, so "tokens the baseline needs to reach L" is
the smallest measured budget that got there, and the curve read is never ambiguous. A flat stretch
resolves to its first (cheapest) budget for the same reason.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Bound = Literal["=", ">", "<"]


@dataclass(frozen=True)
class Ratio:
    """A speed-up: exact (``=``) or a bound (``>``/``<``) when outside the measured range."""

    value: float
    bound: Bound = "="

    @property
    def exact(self) -> bool:
        return self.bound == "="

    def text(self) -> str:
        shown = f"{self.value:.3g}×"
        return shown if self.exact else f"{self.bound} {shown}"


@dataclass(frozen=True)
class SpeedUp:
    """Headline speed-up (from the mean loss over seeds) and the spread of the per-seed values."""

    ratio: Ratio | None
    per_seed: tuple[Ratio, ...]
    std: float | None  # over seeds, only when every seed is inside the measured range

    def text(self) -> str:
        if self.ratio is None:
            return "n/a"
        if self.std is None or not self.ratio.exact:
            return self.ratio.text()
        return f"{self.ratio.value:.3g}× ± {self.std:.2g}"

    def as_dict(self) -> dict[str, object]:
        return {
            "value": None if self.ratio is None else self.ratio.value,
            "bound": None if self.ratio is None else self.ratio.bound,
            "std": self.std,
            "per_seed": [{"value": r.value, "bound": r.bound} for r in self.per_seed],
            "text": self.text(),
        }


def monotone_envelope(costs: Sequence[float], losses: Sequence[float]) -> list[tuple[float, float]]:
    """``(cost, loss)`` sorted by cost, losses replaced by their running minimum (see module doc)."""
    if len(costs) != len(losses) or not costs:
        raise ValueError("the baseline curve needs as many losses as costs, and at least one point")
    points = sorted(zip(costs, losses, strict=True))
    if any(not (c > 0 and math.isfinite(c)) for c, _ in points):
        raise ValueError("baseline costs must be positive and finite")
    envelope: list[tuple[float, float]] = []
    best = math.inf
    for cost, loss in points:
        if math.isfinite(loss):
            best = min(best, loss)
        envelope.append((cost, best))
    return envelope


def cost_to_reach(costs: Sequence[float], losses: Sequence[float], target: float) -> tuple[float, Bound]:
    """Baseline cost (tokens or seconds) to reach ``target`` loss, interpolated in log-cost.

    Returns ``(cost, "=")`` inside the measured range; ``(largest cost, ">")`` when the baseline
    never got that low; ``(smallest cost, "<")`` when it was already better at its smallest budget.
    """
    envelope = [(c, loss) for c, loss in monotone_envelope(costs, losses) if math.isfinite(loss)]
    if not envelope:
        raise ValueError("the baseline has no finite loss at any budget")
    first_cost, first_loss = envelope[0]
    if target > first_loss:
        return first_cost, "<"
    if target == first_loss:
        return first_cost, "="
    for (c0, l0), (c1, l1) in itertools.pairwise(envelope):
        if l1 <= target < l0:
            fraction = (l0 - target) / (l0 - l1)
            return math.exp(math.log(c0) + fraction * (math.log(c1) - math.log(c0))), "="
    return envelope[-1][0], ">"


def ratio(costs: Sequence[float], losses: Sequence[float], target: float, used: float) -> Ratio:
    """Speed-up of a run that reached ``target`` loss having spent ``used`` (same unit as costs)."""
    if not (used > 0 and math.isfinite(used)):
        raise ValueError("the cost an optimizer used must be positive and finite")
    if not math.isfinite(target):
        # A diverged run reached nothing: it is slower than the baseline at its smallest budget.
        return Ratio(min(costs) / used, "<")
    needed, bound = cost_to_reach(costs, losses, target)
    return Ratio(needed / used, bound)


def speedup(
    costs: Sequence[float], losses: Sequence[float], seed_losses: Sequence[float], seed_costs: Sequence[float]
) -> SpeedUp:
    """Speed-up of an optimizer over its seeds.

    ``costs``/``losses``: the baseline's curve (one point per budget, losses averaged over seeds).
    ``seed_losses``/``seed_costs``: the optimizer's final loss and cost per seed. The headline is
    the speed-up at the mean loss and mean cost; ``std`` is the sample standard deviation of the
    per-seed speed-ups, given only when each of them is exact (a spread of bounds means nothing).
    """
    if len(seed_losses) != len(seed_costs):
        raise ValueError("one cost per seed loss")
    if not seed_losses:
        return SpeedUp(None, (), None)
    pairs = zip(seed_losses, seed_costs, strict=True)
    per_seed = tuple(ratio(costs, losses, loss, used) for loss, used in pairs)
    mean_loss = statistics.fmean(seed_losses) if all(map(math.isfinite, seed_losses)) else math.inf
    headline = ratio(costs, losses, mean_loss, statistics.fmean(seed_costs))
    std = None
    if len(per_seed) >= 2 and all(r.exact for r in per_seed):
        std = statistics.stdev(r.value for r in per_seed)
    return SpeedUp(headline, per_seed, std)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (std None below two values)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) >= 2 else None)
