"""Request and response bodies of every endpoint, one family per resource. Limits live here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_ITEMS = 1000  # items per sequence or exclusion list in one request


class _In(BaseModel):
    # Unknown fields are errors: a typo such as "exclude_seen_items" must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------- recommend


class RecommendRequest(_In):
    user_id: Id | None = None  # the stored history is used, with `items` appended
    items: list[Id] = Field(default_factory=list, max_length=MAX_ITEMS)  # raw item ids, oldest first
    k: int = Field(10, ge=1, le=1000)
    use_retrieval: bool = True  # accepted; retrieval_used says whether it happened
    exclude_seen: bool = True
    exclude_items: list[Id] = Field(default_factory=list, max_length=MAX_ITEMS)
    explain: bool = False

    @model_validator(mode="after")
    def _user_or_items(self) -> RecommendRequest:
        if self.user_id is None and not self.items:
            raise ValueError("give a user_id, a non-empty items list, or both")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Explanation(BaseModel):
    sequence: list[str]  # the known items the model read, oldest first
    neighbours: list[str] = Field(default_factory=list)  # retrieved neighbours (empty until retrieval is served)
    alpha: float | None = None  # fusion weight of the retrieval branch


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    index_version: str | None
    retrieval_used: bool
    fallback: Literal["popular"] | None
    unknown_items: list[str]
    explanation: Explanation | None = None


class BatchRecommendRequest(_In):
    requests: list[RecommendRequest] = Field(min_length=1)  # the upper limit is settings.max_batch


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse]


# ----------------------------------------------------------------------------------------- events


class EventIn(_In):
    user_id: Id
    item_id: Id
    # Seconds since the epoch; NaN, infinities and negatives are refused. None: the server's clock.
    timestamp: float | None = Field(None, ge=0, allow_inf_nan=False)


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int


# ------------------------------------------------------------------------------------------ users


class HistoryEntry(BaseModel):
    item_id: str
    timestamp: float


class HistoryResponse(BaseModel):
    user_id: str
    items: list[HistoryEntry]  # oldest first, capped to the newest max_history


# ----------------------------------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded"]
    checks: dict[str, bool]
    detail: str | None = None
