"""Response models of the REST API (requests use ``server.jobs.spec.JobSpec`` directly)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Progress(BaseModel):
    fraction: float = Field(
        ...,
        description="steps actually trained / steps planned over all runs; a job that ended early "
        "(cancelled, failed, diverged) keeps the fraction it reached",
    )
    steps_done: int
    steps_total: int
    runs: dict[str, int] = Field(..., description="number of runs per status")


class WinnerOut(BaseModel):
    label: str = Field(..., description="the best configuration by the task's primary metric")
    optimizer: str
    metric: str
    title: str | None = None
    higher_is_better: bool = False
    mean: float
    std: float | None
    seeds: int
    runner_up: str | None
    margin: float | None = Field(None, description="how far the runner-up's mean is behind (>= 0)")


class FisherVerdictOut(BaseModel):
    label: str = Field(..., description="the configuration whose gradients the verdict is about")
    verdict: str | None
    by_label: dict[str, dict[str, Any]] = Field(
        ...,
        description="per configuration: gaps above the floor per method, layers, reports, closed, verdict",
    )


class JobResultsOut(BaseModel):
    job_id: int
    status: str
    primary_metric: str = Field(..., description="the summary key judging the job, e.g. final_val_accuracy")
    primary: dict[str, str] | None = Field(None, description="name, title and better (min/max) of it")
    target_loss: float | None
    target_metric: dict[str, Any] | None = Field(None, description="{name, op, value} or null")
    runs: dict[str, int] = Field(..., description="total, succeeded, partial (stopped early), pending")
    rows: list[dict[str, Any]] = Field(
        ...,
        description="one per optimizer configuration: counts, <metric>_mean/_std/_n over the runs that "
        "finished their schedule, speed-ups to target; null where there is no value",
    )
    best: dict[str, list[str]] = Field(
        ...,
        description="per column (metric key), the labels holding the best value (empty: none stands out)",
    )
    winner: WinnerOut | None = Field(None, description="null until every run ended and none failed")
    winner_text: str | None
    fisher: FisherVerdictOut | None


class RunOut(BaseModel):
    id: int
    index: int
    label: str
    optimizer: str
    seed: int
    status: str
    reason: str | None
    step: int
    total_steps: int
    attempt: int
    worker: str | None
    device: str | None
    queue: str
    cancel_requested: bool
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_seconds: float | None
    hyperparameters: dict[str, Any]
    sweep_point: dict[str, Any]
    summary: dict[str, Any] | None


class JobSummaryOut(BaseModel):
    id: int
    name: str
    status: str
    reason: str | None
    cancel_requested: bool
    rerun_of: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    progress: Progress
    winner: WinnerOut | None = Field(None, description="set once the job ended (GET /jobs/{id}/summary)")


class JobOut(JobSummaryOut):
    spec: dict[str, Any]
    runs: list[RunOut]
    links: dict[str, str]
    warnings: list[str] = Field(default_factory=list)


class JobPage(BaseModel):
    items: list[JobSummaryOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class SeriesOut(BaseModel):
    run_id: int
    label: str
    seed: int
    name: str
    step: list[int]
    value: list[float | None] = Field(
        ..., description="mean of the bucket (the point itself when unbucketed)"
    )
    min: list[float | None]
    max: list[float | None]
    count: list[int]


class AggregateOut(BaseModel):
    label: str
    name: str
    step: list[int]
    mean: list[float | None]
    min: list[float | None]
    max: list[float | None]
    std: list[float | None] = Field(..., description="sample standard deviation across seeds")
    n: list[int] = Field(..., description="number of seeds contributing")


class MetricsOut(BaseModel):
    job_id: int
    names: list[str]
    max_points: int
    bucket_width: int = Field(..., description="steps per bucket; buckets are [k*width, (k+1)*width)")
    source: str = Field(
        ..., description="'raw' points or 'rollup/<width>' (pre-bucketed series of ended runs)"
    )
    series: list[SeriesOut]
    aggregates: list[AggregateOut]


class FisherSeriesOut(BaseModel):
    run_id: int
    label: str
    seed: int
    layer: str
    method: str
    metric: str
    step: list[int]
    value: list[float | None]


class FisherOut(BaseModel):
    job_id: int
    series: list[FisherSeriesOut]


class StudyJobOut(BaseModel):
    id: int
    scale: str
    name: str
    status: str
    reason: str | None


class StudySummaryOut(BaseModel):
    id: int
    name: str
    status: str = Field(..., description="derived from its jobs (one per scale)")
    reason: str | None
    created_at: datetime
    jobs: list[StudyJobOut]


class StudyOut(StudySummaryOut):
    spec: dict[str, Any]
    report: dict[str, Any] = Field(
        ...,
        description="per scale: the baseline's loss-vs-tokens curve and, per optimizer, its sweep, winner, "
        "edge flags, final loss over seeds, token and time speed-ups over the baseline (bounds outside "
        "the measured range); recomputed from the runs on every read",
    )
    links: dict[str, str]
    warnings: list[str] = Field(default_factory=list)
