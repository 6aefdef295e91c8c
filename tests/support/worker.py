"""Shared helpers for the worker tests: a tiny task and job, (the ``data_roots`` fixture is in conftest)."""

from __future__ import annotations

from typing import Any


def tiny_task(**overrides: Any) -> dict[str, Any]:
    """A GPT small enough that a dozen steps take well under a second on one core."""
    task = {
        "kind": "pretrain",
        "n_layer": 1,
        "n_head": 2,
        "d_model": 32,
        "context": 16,
        "batch_size": 4,
        "steps": 8,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_batches": 2,
        "log_every": 1,
        "corpus": {"name": "pydoc", "max_chars": 200_000},
    }
    task.update(overrides)
    return task


def tiny_job(optimizers: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "tiny",
        "device": "cpu",
        "seeds": [0],
        "task": tiny_task(),
        "optimizers": optimizers or [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}],
    }
    job.update(overrides)
    return job
