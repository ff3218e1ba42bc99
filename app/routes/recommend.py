"""POST /v1/recommend and /v1/recommend/batch."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import ValidationError

from app.batcher import MicroBatcher
from app.deps import BatcherDep, EngineDep, SettingsDep, StoreDep
from app.engine import Engine, Query, Recommendation
from app.middleware import replay
from app.schemas import BatchRecommendRequest, BatchRecommendResponse, RecommendRequest, RecommendResponse
from app.store import Store, StoreUnavailable

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/recommend", tags=["recommend"])


async def _query(req: RecommendRequest, store: Store) -> Query:
    """The request as an engine query; with a user_id, the user's training-data history (added by
    the engine) and stored events come first. Raises StoreUnavailable (-> 503) when the events
    cannot be read."""
    items = list(req.items)
    if req.user_id is not None:
        items = [item for item, _ in await store.history(req.user_id)] + items
    return Query(items=items, k=req.k, exclude_seen=req.exclude_seen, exclude_items=list(req.exclude_items),
                 user_id=req.user_id, use_retrieval=req.use_retrieval, explain=req.explain)


def _payload(req: RecommendRequest, rec: Recommendation, engine: Engine) -> dict:
    """The answer as RecommendResponse's JSON object, built directly: a recommendation is the
    service's hottest path, and constructing and re-validating the pydantic models cost more
    server CPU than the model's forward pass (bench/serve_load.py). tests/integration/test_response_encoding.py
    checks every answer against RecommendResponse's schema."""
    return {
        "items": [{"item_id": i, "score": s} for i, s in zip(rec.items, rec.scores, strict=True)],
        "model_version": engine.model_version,
        "index_version": rec.index_version,
        "retrieval_used": rec.retrieval_used,
        "fallback": rec.fallback,
        "unknown_items": rec.unknown_items,
        "explanation": {"sequence": rec.sequence, "neighbours": rec.neighbours or [], "fusion": rec.fusion}
        if req.explain else None,
    }


def _json(obj: object) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")


def _cache_key(q: Query) -> str:
    """Everything the answer depends on besides the model and index, which key the cache's version."""
    raw = orjson.dumps([q.items, q.k, q.exclude_seen, sorted(set(q.exclude_items)), q.user_id, q.use_retrieval,
                        q.explain])
    return "rec:" + hashlib.sha256(raw).hexdigest()


async def _cached(store: Store, key: str, version: str) -> Recommendation | None:
    """A cached answer, or None; a store that is down only costs the cache, never the request."""
    try:
        raw = await store.cache_get(key, version)
    except StoreUnavailable as e:
        logger.debug("result cache skipped: %s", e)
        return None
    return None if raw is None else Recommendation(**orjson.loads(raw))


async def _cache(store: Store, key: str, version: str, rec: Recommendation, ttl_s: float) -> None:
    try:  # vars(): its fields are JSON already (lists, dicts, str, float), no deep copy needed
        await store.cache_set(key, version, orjson.dumps(vars(rec)), ttl_s)
    except StoreUnavailable as e:
        logger.debug("result not cached: %s", e)


async def answer(req: RecommendRequest, state: Any, batcher: MicroBatcher) -> bytes:
    """The JSON answer to a validated request, from the app's resources (``state``): the route and
    the fast path below both answer with it."""
    engine: Engine = state.engine
    store: Store = state.store
    query = await _query(req, store)
    key, version = _cache_key(query), engine.cache_version
    rec = await _cached(store, key, version)
    state.metrics.cache_outcome(rec is not None)
    if rec is None:
        rec = await batcher.recommend(query)
        await _cache(store, key, version, rec, state.settings.cache_ttl_s)
    return orjson.dumps(_payload(req, rec, engine))


@router.post("", response_model=RecommendResponse)
async def recommend(req: RecommendRequest, request: Request, batcher: BatcherDep) -> Response:
    """Ranked items for a user's stored history and/or the given items (appended after the history).
    503 when a user_id is given and the history store is down."""
    # Only the batcher is a dependency (tests replace it); each one costs a resolution per request.
    return Response(await answer(req, request.app.state, batcher), media_type="application/json")


@router.post("/batch", response_model=BatchRecommendResponse)
async def recommend_batch(body: BatchRecommendRequest, engine: EngineDep, store: StoreDep,
                          settings: SettingsDep, batcher: BatcherDep) -> Response:
    if len(body.requests) > settings.max_batch:
        raise HTTPException(422, f"a batch holds at most {settings.max_batch} requests, got {len(body.requests)}")
    queries = list(await asyncio.gather(*(_query(r, store) for r in body.requests)))
    recs = await batcher.run(queries)  # one forward pass for the batch, on the inference thread
    return _json({"results": [_payload(r, rec, engine) for r, rec in zip(body.requests, recs, strict=True)]})


PATH = "/v1/recommend"
_ROUTE = next(r for r in router.routes if getattr(r, "path", None) == PATH)
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _json_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request declares a plain JSON body (the only kind the fast path takes)."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False  # FastAPI does not parse a body without a content type as JSON either


class FastRecommend:
    """POST /v1/recommend answered without the framework's routing, request objects, dependency
    resolution and python-mode validation: the service's hottest request, and those cost more
    server CPU than its forward pass (bench/serve_breakdown.py, docs/serving.md).

    Pure ASGI, installed innermost (the body limit, error and metrics middleware still wrap it).
    It answers only what it fully accepts: a declared JSON body that
    ``RecommendRequest.model_validate_json`` validates, no dependency overrides (tests replace
    the batcher), the history store up. Anything else goes to the app unchanged, body replayed,
    so a 422, 503 or any other answer comes from the route itself, message for message; and
    what both accept is answered by the same ``answer``. tests/integration/test_fast_path.py
    holds the two paths to the same answers and the same validation."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        app = scope.get("app")
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in (PATH, scope.get("root_path", "") + PATH)  # mounted under a root path too
                or app is None or app.dependency_overrides or not _json_body(scope["headers"])):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError:  # the route answers it: the 422 and its message are the route's
            await self.app(scope, replay(body, receive), send)
            return
        try:
            out = await answer(req, app.state, app.state.batcher)
        except StoreUnavailable:  # raised before any inference (reading the history): the route's 503
            await self.app(scope, replay(body, receive), send)
            return
        scope["route"] = _ROUTE  # what the router would have set: the metrics label the answer by it
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_JSON_HEADERS, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
