"""The versioned API router (mounted at /api/v1)."""

from fastapi import APIRouter

from server.api.routes import health, jobs, metrics, registry, studies

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(metrics.router)
api_router.include_router(registry.router)
api_router.include_router(studies.router)
api_router.add_api_route("/healthz", health.healthz, methods=["GET"], tags=["health"], summary="Liveness")
api_router.add_api_route("/readyz", health.readyz, methods=["GET"], tags=["health"], summary="Readiness")
