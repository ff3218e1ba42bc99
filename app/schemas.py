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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "196", "k": 10, "explain": True}, {"items": ["242", "302", "377"], "k": 5, "use_retrieval": False}]})

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


class Neighbour(BaseModel):
    """One retrieved memory-bank entry: a user's prefix and the items that followed it."""

    user_id: str  # whose sequence it is
    target_item: str  # the item that came next in it ("" when the query may not see it)
    next_items: list[str] = Field(default_factory=list)  # the items after the prefix that vote, in order
    position: int  # where target_item sits in the user's sequence (0-based)
    similarity: float  # cosine of the query to the entry's key
    weight: float  # its share of the vote, or the reader's attention (the weights sum to at most 1)
    # what this neighbour added to the score of each returned item (vote: probability mass)
    contributions: dict[str, float] = Field(default_factory=dict)


class FusionSummary(BaseModel):
    """How much of the output retrieval decided: the vote's λ, or the head's copy gate / alpha."""

    kind: str  # the retrieval design: "vote" or "head"
    temperature: float | None  # the vote's similarity temperature (None for the head)
    alpha_mean: float
    alpha_std: float
    alpha_min: float
    alpha_max: float


class Explanation(BaseModel):
    sequence: list[str]  # the known items the model read, oldest first
    neighbours: list[Neighbour] = Field(default_factory=list)  # empty when retrieval was not used
    fusion: FusionSummary | None = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    index_version: str | None
    retrieval_used: bool
    fallback: Literal["popular"] | None
    unknown_items: list[str]
    explanation: Explanation | None = None


class BatchRecommendRequest(_In):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"requests": [{"user_id": "196", "k": 5}, {"items": ["50", "172"], "k": 5}]}]})

    requests: list[RecommendRequest] = Field(min_length=1)  # the upper limit is settings.max_batch


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse]


# ----------------------------------------------------------------------------------------- events


class EventIn(_In):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"user_id": "196", "item_id": "50", "timestamp": 1700000000.0}]})

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


# ------------------------------------------------------------------------------------------ index


class IndexInfo(BaseModel):
    retrieval: bool  # the served run has a retrieval model
    version: str | None  # None: no bank served (yet)
    size: int | None = None  # live entries, events added since the build included
    type: str | None = None  # faiss index kind: flat, ivf_flat, ivf_pq, hnsw
    device: str | None = None  # cpu or cuda:N
    built_at: str | None = None
    model_version: str | None = None  # the model whose retriever made the keys
    live_added: int = 0  # entries added from events since start-up
    versions: list[str] = Field(default_factory=list)  # on disk, oldest first
    watch_error: str | None = None  # why the store's current version is not served here, if it is not


class LoadIndexRequest(_In):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": "v000003"}]})

    version: Annotated[str, StringConstraints(pattern=r"^v\d{6,}$")]  # e.g. "v000003"


class JobAccepted(BaseModel):
    job_id: str
    status: str
    url: str  # where to follow it


# ------------------------------------------------------------------------------------- evaluation


class EvalSequence(_In):
    items: list[Id] = Field(min_length=1, max_length=MAX_ITEMS)  # raw item ids, oldest first
    target: Id  # the item that came next
    user_id: Id | None = None  # the user's own bank entries are then not retrieved


class EvaluateRequest(_In):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"split": "test"}, {"sequences": [{"items": ["242", "302"], "target": "377", "user_id": "196"}], "ks": [10]}]})

    # "valid"/"test": the served run's held-out split (leave-one-out), with a leakage-safe bank
    # (training examples; plus validation examples for test). Or give `sequences` instead.
    split: Literal["valid", "test"] | None = "test"
    sequences: list[EvalSequence] | None = Field(None, min_length=1)
    ks: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=lambda: [5, 10, 20], min_length=1,
                                                           max_length=10)
    bootstrap_resamples: int = Field(2000, ge=100, le=20_000)
    seed: int = 0
    # drop each sequence's own items from both rankings (what the service serves); false gives
    # RecBole's unmasked protocol
    mask_seen: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateRequest:
        if self.sequences is not None:
            self.split = None
        elif self.split is None:
            raise ValueError("give a split or sequences")
        return self
