"""The study schema: scales × optimizers (each tuned on an equal sweep budget) × seeds, one baseline.

A ``StudySpec`` is validated in the same style as the job spec (``StrictModel``: unknown fields,
NaN and inf are errors; messages name the field) because it faces the same untrusted REST clients.
Each scale is a named set of task overrides merged over the study's shared ``task`` and validated
by the job spec's own ``TaskSpec`` (so presets and any other task field work as they do in a job);
errors therefore read ``scales.1.task.n_layer: …``.

Fairness rules enforced here, before anything is written:

- every optimizer gets the same number of sweep points (an optimizer without a sweep while others
  sweep is the common mistake), unless ``allow_unequal_budgets: true`` says otherwise, and the
  study then records that it is unequal;
- the baseline must be one of the optimizers (by its display name, default ``adamw``);
- budget multipliers (the baseline's extra runs at 2×, 4× … the tokens) must be > 1 and increasing;
- at least two seeds: the confirmation stage and the spread over seeds need them.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

# The job contract. It moves to ``server.jobs.spec`` (the server never imports worker/): when this
# branch meets that move, this import is the one line to change; every other study module imports
# the job contract from here.
from server.jobs.spec import (
    MAX_RUNS_PER_JOB,
    MAX_SEEDS,
    NAME_RULE,
    JobSpec,
    OptimizerSpec,
    RunSpec,
    StrictModel,
    TaskSpec,
    check_name,
    check_seeds,
    format_validation_error,
)

__all__ = ["JobSpec", "RunSpec", "ScaleSpec", "StudySpec", "format_study_error", "parse_study"]

MAX_SCALES = 8
MAX_BUDGETS = 4


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, nested mappings (corpus, tokenizer…) merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ScaleSpec(StrictModel):
    """One model/data scale: a name (shown on plots and in study.csv) and its task."""

    name: str = Field(..., min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    task: TaskSpec = Field(
        default_factory=TaskSpec,
        description="task overrides for this scale (e.g. {'preset': 'llama-60m'} or model sizes), merged "
        "over the study's shared task",
    )


class StudySpec(StrictModel):
    """A study: one job per scale, equal-budget tuning, confirmation on all seeds, baseline budgets."""

    name: str = Field("study", min_length=1, max_length=60, description=f"must be {NAME_RULE}")
    task: dict[str, Any] = Field(
        default_factory=dict, description="task fields shared by every scale (each scale may override)"
    )
    scales: list[ScaleSpec] = Field(..., min_length=1, max_length=MAX_SCALES)
    optimizers: list[OptimizerSpec] = Field(..., min_length=1, max_length=16)
    seeds: list[int] = Field([0, 1, 2], min_length=2, max_length=MAX_SEEDS)
    baseline: str = Field("adamw", description="display name of the optimizer the speed-ups are relative to")
    budgets: list[float] = Field(
        [2.0, 4.0],
        min_length=1,
        max_length=MAX_BUDGETS,
        description="extra token budgets for the baseline's winner, as multiples of the scale's budget",
    )
    allow_unequal_budgets: bool = Field(
        False, description="allow optimizers with different numbers of sweep points (recorded as unequal)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _merge_shared_task(cls, data: Any) -> Any:
        """Each scale's task is the shared task with the scale's overrides on top."""
        if not isinstance(data, dict):
            return data
        shared = data.get("task") or {}
        scales = data.get("scales")
        if not isinstance(shared, dict) or not isinstance(scales, list):
            return data
        merged = []
        for scale in scales:
            if isinstance(scale, dict) and isinstance(scale.get("task", {}), dict):
                scale = {**scale, "task": _merge(shared, scale.get("task") or {})}
            merged.append(scale)
        return {**data, "scales": merged}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return check_seeds(value)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        if any(m <= 1 for m in value):
            raise ValueError(f"budget multipliers must be greater than 1 (1x is the scale); got {value}")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"budget multipliers must be strictly increasing; got {value}")
        return value

    @field_validator("scales")
    @classmethod
    def _scale_names(cls, value: list[ScaleSpec]) -> list[ScaleSpec]:
        names = [scale.name for scale in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scale names must be unique; repeated: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _fair(self) -> StudySpec:
        displays = [opt.display for opt in self.optimizers]
        if self.baseline not in displays:
            raise ValueError(
                f"baseline: {self.baseline!r} is not among the optimizers ({', '.join(displays)}); "
                "add it or set 'baseline' to one of them"
            )
        sizes = {opt.display: opt.sweep_size() for opt in self.optimizers}
        if len(set(sizes.values())) > 1 and not self.allow_unequal_budgets:
            unswept = [name for name, size in sizes.items() if size == 1 and not self._opt(name).sweep]
            largest = max(sizes.values())
            if unswept:
                raise ValueError(
                    f"optimizers: {', '.join(unswept)}: no sweep while others "
                    f"sweep up to {largest} points: an untuned optimizer makes the comparison unfair; give "
                    "every optimizer a grid of the same size or set allow_unequal_budgets: true"
                )
            shown = ", ".join(f"{name} {size}" for name, size in sizes.items())
            raise ValueError(
                f"optimizers: different tuning budgets (sweep points: {shown}); make them equal or "
                "set allow_unequal_budgets: true"
            )
        for index, scale in enumerate(self.scales):
            for multiplier in self.budgets:
                steps = scale.task.steps * multiplier
                if steps != int(steps):
                    raise ValueError(
                        f"budgets: steps of scale {scale.name!r} ({scale.task.steps}) x {multiplier:g} "
                        "is not a whole number of steps"
                    )
            try:
                job = self.job_spec(index)
            except ValidationError as exc:
                raise ValueError(f"scales.{index} ({scale.name}): {format_validation_error(exc)}") from None
            # the job's own limits apply to the whole scale, budget runs included
            job_spec_limit(job, extra=len(self.budgets) * len(self.seeds), where=f"scales.{index}")
            try:
                TaskSpec.model_validate({**scale.task.model_dump(), "steps": int(steps)})
            except ValidationError as exc:
                raise ValueError(
                    f"budgets: scale {scale.name!r} at {multiplier:g}x: {format_validation_error(exc)}"
                ) from None
        return self

    def _opt(self, display: str) -> OptimizerSpec:
        return next(opt for opt in self.optimizers if opt.display == display)

    @property
    def baseline_optimizer(self) -> OptimizerSpec:
        return self._opt(self.baseline)

    def equal_budgets(self) -> bool:
        return len({opt.sweep_size() for opt in self.optimizers}) == 1

    def job_name(self, index: int) -> str:
        """Unique per scale within the study (scale names are unique and kept whole)."""
        return f"{self.name[:39]} {self.scales[index].name}"

    def job_spec(self, index: int) -> JobSpec:
        """The job of one scale: sweep on the first seed, the winners on every seed."""
        return JobSpec(
            name=self.job_name(index),
            task=self.scales[index].task,
            optimizers=self.optimizers,
            seeds=self.seeds,
            device=self.device,
            sweep_selection="first_seed",
        )

    def run_count(self) -> int:
        per_scale = self.job_spec(0).run_count() + len(self.budgets) * len(self.seeds)
        return per_scale * len(self.scales)


def job_spec_limit(job: JobSpec, *, extra: int, where: str) -> None:
    """The job schema's cap on runs, counting the study's budget runs added to the job."""
    total = job.run_count() + extra
    if total > MAX_RUNS_PER_JOB:
        raise ValueError(
            f"{where}: the scale expands to {total} runs (sweeps, confirmation seeds and the baseline's "
            f"budget runs); the limit is {MAX_RUNS_PER_JOB}"
        )


def budget_label(label: str, multiplier: float) -> str:
    return f"{label}@{multiplier:g}x"


def budget_run_specs(
    job: JobSpec, baseline: str, point: dict[str, Any], budgets: list[float]
) -> list[RunSpec]:
    """The baseline's winner at each larger budget on every seed (steps × multiplier, same schedule
    shape: warm-up unchanged, the decay stretched over the longer run)."""
    opt = next(o for o in job.optimizers if o.display == baseline)
    specs = []
    for multiplier in budgets:
        task = job.task.model_copy(update={"steps": int(job.task.steps * multiplier)})
        for seed in job.seeds:
            base = job._run(opt, point, seed)
            label = budget_label(base.label, multiplier)
            specs.append(
                base.model_copy(
                    update={
                        "task": task,
                        "label": label,
                        "group": budget_label(base.group, multiplier),
                        "run_key": f"{label}-s{seed}",
                    }
                )
            )
    return specs


def format_study_error(exc: ValidationError) -> str:
    """``format_validation_error`` with study-level problems labelled ``(study)``."""
    return format_validation_error(exc).replace("(job): ", "(study): ")


def parse_study(data: Any) -> StudySpec:
    """Validate a mapping (parsed YAML or JSON) into a ``StudySpec``; raises ``ValidationError``."""
    return StudySpec.model_validate(data)
