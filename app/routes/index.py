"""GET /v1/index, and the admin actions on it: rebuild (a job), rollback, load a version."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, status

from app.deps import JobsDep, require_api_key
from app.jobs import Jobs, RebuildBusy
from app.schemas import IndexInfo, JobAccepted, LoadIndexRequest
from retriever.errors import RetrieverError

router = APIRouter(prefix="/v1/index", tags=["index"])


@router.get("", response_model=IndexInfo)
async def get_index(request: Request) -> IndexInfo:
    """The memory bank this replica serves."""
    jobs = request.app.state.jobs
    return IndexInfo(retrieval=False, version=None) if jobs is None else _info(jobs)


@router.post("/rebuild", response_model=JobAccepted, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[Depends(require_api_key)], responses={409: {"description": "a rebuild is running"}})
async def rebuild(jobs: JobsDep) -> JobAccepted:
    """Start a rebuild: every stored sequence re-encoded with the served model, a new bank built,
    validated, published as a new version and swapped in on every replica. 409 if one is running."""
    try:
        job = await jobs.start_rebuild("on-demand")
    except RebuildBusy as e:
        raise HTTPException(409, str(e)) from None
    return JobAccepted(job_id=job["id"], status=job["status"], url=f"/v1/jobs/{job['id']}")


@router.post("/rollback", response_model=IndexInfo, dependencies=[Depends(require_api_key)],
             responses={409: {"description": "nothing to roll back to, or that version is refused"}})
async def rollback(jobs: JobsDep) -> IndexInfo:
    """Serve the version before the current one (on every replica) and make it current."""
    try:
        await jobs.rollback()
    except RetrieverError as e:
        raise HTTPException(409, f"rollback refused: {e}") from None
    return _info(jobs)


@router.post("/load", response_model=IndexInfo, dependencies=[Depends(require_api_key)],
             responses={409: {"description": "the version is missing, corrupted or made by another model"}})
async def load(body: LoadIndexRequest, jobs: JobsDep) -> IndexInfo:
    """Serve a stored version and make it current on every replica, after verifying its checksums,
    producer model and recall; if it is refused, the old index keeps serving and nothing changes."""
    try:
        await jobs.switch(body.version)
    except RetrieverError as e:
        raise HTTPException(409, f"index {body.version} refused: {e}") from None
    return _info(jobs)


def _info(jobs: Jobs) -> IndexInfo:
    serving = jobs.manager.serving
    info = serving.info() if serving is not None else {"version": None}
    return IndexInfo(retrieval=True, **info, live_added=jobs.manager.live_added,
                     versions=jobs.manager.store.versions(), watch_error=jobs.last_watch_error)
