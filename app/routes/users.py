"""GET /v1/users/{user_id}/history."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import StoreDep
from app.schemas import HistoryEntry, HistoryResponse

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.get("/{user_id}/history", response_model=HistoryResponse)
async def get_history(user_id: str, store: StoreDep) -> HistoryResponse:
    """Stored events, oldest first; an unknown user has an empty history."""
    items = [HistoryEntry(item_id=i, timestamp=t) for i, t in await store.history(user_id)]
    return HistoryResponse(user_id=user_id, items=items)
