"""GET /v1/jobs and /v1/jobs/{job_id}: background job records (admin; rebuild jobs write them)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query

from app.deps import StoreDep, require_api_key

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])


@router.get("")
async def list_jobs(store: StoreDep, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[dict[str, Any]]:
    """Job records, most recently created first."""
    return await store.list_jobs(limit)


@router.get("/{job_id}")
async def get_job(job_id: str, store: StoreDep) -> dict[str, Any]:
    job = await store.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id!r}")
    return job
