"""GET /healthz (the process answers), /readyz (it can serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import StoreDep
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request, store: StoreDep) -> JSONResponse:
    """503 with status "degraded" when a dependency is down (the store, or for a retrieval run its
    index). Requests that carry their own items are still served then (without an index: without
    retrieval); those that need a stored history get 503 while the store is down."""
    checks = {"model": getattr(request.app.state, "engine", None) is not None, "store": await store.ping()}
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is not None:  # a retrieval-augmented run: its index must be served too
        checks["index"] = jobs.manager.serving is not None
    if all(checks.values()):
        return JSONResponse(Readiness(status="ready", checks=checks).model_dump())
    down = ", ".join(name for name, ok in checks.items() if not ok)
    body = Readiness(status="degraded", checks=checks, detail=f"unavailable: {down}")
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
