"""What can be compared: optimizer schemas (from ``dykaf.baselines.registry``) and the task schema."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server.auth import read_access
from server.jobs.spec import job_schema, task_schema

router = APIRouter(tags=["registry"], dependencies=[Depends(read_access)])


@router.get("/optimizers", summary="Optimizers with their hyperparameter schemas and defaults")
def optimizers() -> list[dict[str, Any]]:
    from dykaf.baselines.registry import all_schemas

    return all_schemas()


@router.get("/tasks", summary="The task schema (model, data, schedule) with defaults")
def tasks() -> dict[str, Any]:
    return {"task": task_schema(), "job": job_schema()}
