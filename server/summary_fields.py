"""How a run summary's integer fields are written to a CSV (``./lab run``'s and the server's).

A run's summary travels as floats (``RunResult.summary``, JSON in the database), so a step count
arrives as ``60.0``; written as it came it reads like a measurement. The writers format these
fields as integers, and a field whose value means "none" (the ``-1`` an old summary kept for a run
that never evaluated, a NaN) as an empty cell rather than a number someone might average.
"""

from __future__ import annotations

import math
from typing import Any

# Summary keys that count steps or parameters: whole numbers, never negative when present.
INTEGER_FIELDS = frozenset(
    {
        "final_step",
        "best_val_step",
        "steps_to_target",
        "diverged_step",
        "resumed_from_step",
        "parameters",
        "trainable_parameters",
    }
)


def integer_cell(value: Any) -> str:
    """``value`` as an integer's text; ``""`` for None, a non-number, NaN/inf or a negative count."""
    if value is None or isinstance(value, bool):
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(number) or number < 0:
        return ""
    return str(round(number))
