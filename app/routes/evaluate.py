"""POST /v1/evaluate (a job) and GET /v1/evaluate/{id}: the served model with and without retrieval."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status

from app.deps import EngineDep, JobsDep, SettingsDep, StoreDep, require_api_key
from app.evaluation import run_evaluation
from app.schemas import EvaluateRequest, JobAccepted

router = APIRouter(prefix="/v1/evaluate", tags=["evaluate"], dependencies=[Depends(require_api_key)])


@router.post("", response_model=JobAccepted, status_code=status.HTTP_202_ACCEPTED)
async def evaluate(req: EvaluateRequest, engine: EngineDep, jobs: JobsDep, settings: SettingsDep) -> JobAccepted:
    """Evaluate on the run's held-out split (with a bank that excludes its targets) or on the given
    sequences, with and without retrieval side by side; the result is in the job record."""
    if req.sequences is not None and len(req.sequences) > settings.max_eval_sequences:
        raise HTTPException(422, f"at most {settings.max_eval_sequences} sequences per evaluation, "
                                 f"got {len(req.sequences)}")
    params = req.model_dump(exclude={"sequences"}) | {"sequences": len(req.sequences or [])}
    job = await jobs.start_job("evaluate", params, lambda job: asyncio.to_thread(run_evaluation, engine, req))
    return JobAccepted(job_id=job["id"], status=job["status"], url=f"/v1/evaluate/{job['id']}")


@router.get("/{job_id}")
async def get_evaluation(job_id: str, store: StoreDep) -> dict[str, Any]:
    """The evaluation job's record; ``result`` holds both metric sets once ``status`` is succeeded."""
    job = await store.get_job(job_id)
    if job is None or job.get("kind") != "evaluate":
        raise HTTPException(404, f"no evaluation job with id {job_id!r}")
    return job
