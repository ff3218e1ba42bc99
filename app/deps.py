"""Typed dependencies: what a route needs, taken from the resources `lifespan` put on `app.state`.

Tests swap any of them with `app.dependency_overrides[get_engine] = ...`.
They are coroutines on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, and a
request with five of them paid five thread hand-offs (about a quarter of the server's CPU under load).
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from app.batcher import MicroBatcher
from app.engine import Engine
from app.jobs import Jobs
from app.middleware import ServiceMetrics
from app.settings import Settings
from app.store import Store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_jobs(request: Request) -> Jobs:
    """The replica's job runner; 409 when the served run has no retrieval model (nothing to index)."""
    jobs = request.app.state.jobs
    if jobs is None:
        raise HTTPException(409, "this service runs a model without retrieval (no retrieval.pt in its run directory); "
                                 "run the retrieval stage (configs/ml100k-ra.yaml) to get an index")
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]


def history_cap(settings: Settings, engine: Engine) -> int:
    """Events kept per user: the setting, else the model's input length (older ones are never read)."""
    return settings.max_history or engine.max_len


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Guard for admin endpoints: the X-API-Key header must equal RAGREC_API_KEY."""
    if settings.api_key is None:
        raise HTTPException(403, "admin endpoints are disabled: the server has no RAGREC_API_KEY set")
    if key is None or not secrets.compare_digest(key.encode(), settings.api_key.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
