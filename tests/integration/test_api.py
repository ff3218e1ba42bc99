"""The service end to end: a tiny trained run, a real uvicorn server on loopback, real HTTP calls.

Recommend/events/history tests run against both stores (in-process and a real redis-server);
expected rankings are recomputed from the saved model file, not taken from the service.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.deps import get_batcher
from app.engine import Engine, MicroBatcher, Query
from app.main import create_app
from app.settings import Settings
from tests.support import LiveServer, client_for
from training.checkpoints import load_model_file
from training.config import load_config
from training.data.readers import read_interactions
from training.data.sequences import Vocabulary
from training.data.synthetic import generate_interactions, write_inter
from training.trainer import run_training

pytestmark = pytest.mark.slow  # a trained run served by uvicorn, once per store

MAX_LEN = 10  # the tiny model's input length, and so the stored history cap
MAX_BODY = 16 * 1024


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a tiny model on generated data: a real run directory, as `ragrec train` writes."""
    root = tmp_path_factory.mktemp("api")
    data = root / "syn.inter"
    write_inter(generate_interactions(80, 40, mean_length=10, seed=5), data)
    cfg = load_config(None, [
        f"data.path={data}", f"data.max_seq_len={MAX_LEN}", "model.dim=16", "model.inner=32", "model.n_layers=1",
        "loss.contrastive=none", "train.epochs=1", "train.batch_size=128", "train.device=cpu", "train.seed=3",
    ])
    out = root / "run"
    run_training(cfg, out, progress=False)
    return out


def settings_for(run_dir: Path, **kw: Any) -> Settings:
    return Settings(run_dir=run_dir, max_body_bytes=MAX_BODY, max_batch=8, max_events=20, **kw)


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def api(request: pytest.FixtureRequest, run_dir: Path) -> Iterator[httpx.Client]:
    """A client of a live server, once with the in-process store and once with Redis."""
    kw: dict[str, Any] = {}
    if request.param == "redis":
        kw = {"redis_url": request.getfixturevalue("redis_server").url, "redis_prefix": f"api-{uuid.uuid4().hex}"}
    with LiveServer(create_app(settings_for(run_dir, **kw))) as server, client_for(server) as client:
        yield client


@pytest.fixture(scope="module")
def memory_api(run_dir: Path) -> Iterator[httpx.Client]:
    with LiveServer(create_app(settings_for(run_dir))) as server, client_for(server) as client:
        yield client


class Reference:
    """Independent expectations: the saved model run directly, popularity counted from the data file."""

    def __init__(self, run_dir: Path) -> None:
        self.model, _ = load_model_file(run_dir / "model.pt")
        self.model.eval()
        self.vocab = Vocabulary.load(run_dir / "items.json")

    def top(self, items: list[str], k: int, masked: set[str] = frozenset()) -> list[str]:
        ids = [self.vocab.lookup(i) for i in items]
        ids = [i for i in ids if i][-MAX_LEN:]
        with torch.no_grad():
            scores = self.model.scores(self.model(torch.tensor([ids])))[0]
        order = [self.vocab.tokens[j] for j in torch.argsort(scores, descending=True).tolist()]
        return [t for t in order if t not in masked][:k]


@pytest.fixture(scope="session")
def ref(run_dir: Path) -> Reference:
    return Reference(run_dir)


def ids_of(body: dict) -> list[str]:
    return [x["item_id"] for x in body["items"]]


def recommend(client: httpx.Client, **body: Any) -> dict:
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------ recommend


def test_recommend_by_items_matches_the_model(api: httpx.Client, ref: Reference) -> None:
    seq = ref.vocab.tokens[:4]
    body = recommend(api, items=seq, k=5)
    assert ids_of(body) == ref.top(seq, 5, masked=set(seq))
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["fallback"] is None and body["unknown_items"] == [] and body["retrieval_used"] is False
    assert body["model_version"].startswith("run@") and body["explanation"] is None


def test_unknown_items_are_reported_and_dropped(api: httpx.Client, ref: Reference) -> None:
    a, b = ref.vocab.tokens[5:7]
    body = recommend(api, items=[a, "nope", "[PAD]", "nope", b], k=7)
    assert body["unknown_items"] == ["nope", "[PAD]"]
    assert ids_of(body) == ids_of(recommend(api, items=[a, b], k=7))


def test_cold_requests_fall_back_to_popularity(api: httpx.Client, run_dir: Path, ref: Reference) -> None:
    # popularity counted here from the data file: each user's events minus the two held out
    inter = read_interactions(run_dir.parent / "syn.inter")
    counts: dict[str, int] = {}
    users, items, times = inter.users, inter.items, inter.timestamps
    for u in np.unique(users):
        rows = np.flatnonzero(users == u)
        rows = rows[np.argsort(times[rows], kind="stable")][:-2]
        for i in items[rows]:
            counts[i] = counts.get(i, 0) + 1
    total = sum(counts.values())
    for body in (recommend(api, user_id=f"cold-{uuid.uuid4().hex}", k=40),
                 recommend(api, items=["never-seen"], k=40)):
        assert body["fallback"] == "popular"
        # compared through the counts, so that the order among equally popular items does not matter
        every = sorted((counts.get(t, 0) for t in ref.vocab.tokens), reverse=True)  # items only held out count 0
        assert [counts.get(i, 0) for i in ids_of(body)] == every
        assert [x["score"] for x in body["items"]] == pytest.approx([counts.get(i, 0) / total for i in ids_of(body)])


def test_exclude_seen_and_exclude_items(api: httpx.Client, ref: Reference) -> None:
    seq = ref.vocab.tokens[10:13]
    unmasked = recommend(api, items=seq, k=40, exclude_seen=False)
    assert ids_of(unmasked) == ref.top(seq, 40)
    assert set(seq) <= set(ids_of(unmasked))
    masked = recommend(api, items=seq, k=40)
    assert not set(seq) & set(ids_of(masked)) and len(masked["items"]) == len(ref.vocab.tokens) - 3
    drop = ids_of(masked)[:2]
    fewer = recommend(api, items=seq, k=5, exclude_items=[*drop, "unknown-item"])
    assert ids_of(fewer) == ref.top(seq, 5, masked={*seq, *drop})


def test_recommend_by_user_uses_history_in_time_order(api: httpx.Client, ref: Reference) -> None:
    user = f"u-{uuid.uuid4().hex}"
    toks = ref.vocab.tokens
    events = [{"user_id": user, "item_id": toks[3], "timestamp": 30},
              {"user_id": user, "item_id": toks[1], "timestamp": 10},
              {"user_id": user, "item_id": toks[2], "timestamp": 20}]
    assert api.post("/v1/events", json=events).json() == {"accepted": 3, "duplicates": 0}
    history = [toks[1], toks[2], toks[3]]
    by_user = recommend(api, user_id=user, k=5, explain=True)
    assert ids_of(by_user) == ref.top(history, 5, masked=set(history))
    assert by_user["explanation"]["sequence"] == history
    appended = recommend(api, user_id=user, items=[toks[8]], k=5)
    assert ids_of(appended) == ids_of(recommend(api, items=[*history, toks[8]], k=5))


def test_batch_matches_single_requests(api: httpx.Client, ref: Reference) -> None:
    toks = ref.vocab.tokens
    reqs = [{"items": toks[:3], "k": 4}, {"items": ["zzz"], "k": 2}, {"items": toks[20:25], "k": 6, "exclude_seen": False}]
    r = api.post("/v1/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [ids_of(x) for x in results] == [ids_of(recommend(api, **q)) for q in reqs]
    assert results[1]["fallback"] == "popular" and results[1]["unknown_items"] == ["zzz"]


# --------------------------------------------------------------------------------- events, history


def test_history_order_cap_and_duplicates(api: httpx.Client) -> None:
    user = f"h-{uuid.uuid4().hex}"
    events = [{"user_id": user, "item_id": f"i{n}", "timestamp": 1000 - n} for n in range(MAX_LEN + 5)]
    assert api.post("/v1/events", json=events).json() == {"accepted": MAX_LEN + 5, "duplicates": 0}
    again = api.post("/v1/events", json=events[-2:])  # the oldest two were capped away: stored anew
    single = api.post("/v1/events", json=events[0])  # one object, not a list; still stored
    assert again.json()["accepted"] == 2 and single.json() == {"accepted": 0, "duplicates": 1}
    hist = api.get(f"/v1/users/{user}/history").json()
    assert hist["user_id"] == user and len(hist["items"]) == MAX_LEN
    expected = sorted(events, key=lambda e: e["timestamp"])[-MAX_LEN:]  # newest MAX_LEN, oldest first
    assert [(h["item_id"], h["timestamp"]) for h in hist["items"]] == [(e["item_id"], e["timestamp"]) for e in expected]
    assert api.get("/v1/users/nobody-at-all/history").json() == {"user_id": "nobody-at-all", "items": []}


def test_event_without_timestamp_uses_the_server_clock(api: httpx.Client) -> None:
    user = f"t-{uuid.uuid4().hex}"
    before = time.time()
    assert api.post("/v1/events", json={"user_id": user, "item_id": "x"}).status_code == 200
    (entry,) = api.get(f"/v1/users/{user}/history").json()["items"]
    assert before <= entry["timestamp"] <= time.time()


# ----------------------------------------------------------------------------------- bad inputs

BAD_REQUESTS = [
    # (path, raw body or None, status, part of the message)
    ("/v1/recommend", '{"items": ["a"', 422, "body: malformed JSON at character 14"),
    ("/v1/recommend", "", 422, "a JSON request body is required"),
    ("/v1/recommend", "{}", 422, "give a user_id, a non-empty items list, or both"),
    ("/v1/recommend", '{"items": [], "user_id": null}', 422, "give a user_id"),
    ("/v1/recommend", '{"items": ["a"], "k": 0}', 422, "body.k: Input should be greater than or equal to 1"),
    ("/v1/recommend", '{"items": ["a"], "k": 1001}', 422, "body.k: Input should be less than or equal to 1000"),
    ("/v1/recommend", '{"items": ["a"], "k": "ten"}', 422, "body.k"),
    ("/v1/recommend", '{"items": "a"}', 422, "body.items: Input should be a valid list"),
    ("/v1/recommend", '{"items": [""]}', 422, "at least 1 character"),
    ("/v1/recommend", '{"items": ["a"], "exclude_seen_items": true}', 422, "Extra inputs are not permitted"),
    ("/v1/recommend", "[1, 2]", 422, "body"),
    ("/v1/recommend/batch", '{"requests": []}', 422, "at least 1 item"),
    ("/v1/recommend/batch", json.dumps({"requests": [{"items": ["a"]}] * 9}), 422, "at most 8 requests"),
    ("/v1/recommend/batch", '{"requests": [{"items": ["a"], "k": -1}]}', 422, "k: Input should be greater"),
    ("/v1/events", '{"user_id": "u", "item_id": "i", "timestamp": NaN}', 422, "finite number"),
    ("/v1/events", '{"user_id": "u", "item_id": "i", "timestamp": Infinity}', 422, "finite number"),
    ("/v1/events", '{"user_id": "u", "item_id": "i", "timestamp": -1}', 422, "greater than or equal to 0"),
    ("/v1/events", '{"user_id": "u", "item_id": "i", "timestamp": "yesterday"}', 422, "timestamp"),
    ("/v1/events", '{"user_id": "u"}', 422, "item_id"),
    ("/v1/events", "[]", 422, "the event list is empty"),
    ("/v1/events", "null", 422, "expected an event object or a list of event objects"),
    ("/v1/events", '"u1 bought i2"', 422, "expected an event object or a list of event objects"),
    ("/v1/events", '[{"user_id": "u", "item_id": "i"}, {"user_id": "u", "item_id": "i", "timestamp": NaN}]',
     422, "body.1.timestamp: Input should be a finite number"),
    ("/v1/events", json.dumps([{"user_id": "u", "item_id": "i"}] * 21), 422, "at most 20 events per request, got 21"),
    ("/v1/events", '{"user_id": "u", "item_id": "i", "ts": 5}', 422, "body.ts: Extra inputs are not permitted"),
    ("/v1/events", "", 422, "a JSON request body is required"),
]


@pytest.mark.parametrize(("path", "raw", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_4xx_with_a_message(memory_api: httpx.Client, path: str, raw: str, status: int,
                                           message: str) -> None:
    r = memory_api.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert "Traceback" not in r.text


def test_oversized_bodies_get_413(memory_api: httpx.Client) -> None:
    big = json.dumps({"items": ["x" * 100] * (MAX_BODY // 100)}).encode()
    r = memory_api.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 16384 bytes" in r.json()["detail"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies to the bytes received
        for n in range(0, len(big), 4096):
            yield big[n: n + 4096]

    r = memory_api.post("/v1/recommend", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
    assert memory_api.post("/v1/recommend", json={"items": ["a"]}).status_code == 200  # still serving


def test_unexpected_errors_are_500_without_internals(run_dir: Path) -> None:
    class Broken:
        async def recommend(self, query: Query) -> None:
            raise RuntimeError("secret internal detail")

    app = create_app(settings_for(run_dir))
    app.dependency_overrides[get_batcher] = Broken
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        r = client.post("/v1/recommend", json={"items": ["a"]})
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert 'route="/v1/recommend",status="500"' in client.get("/metrics").text


def test_unknown_route_and_method(memory_api: httpx.Client) -> None:
    assert memory_api.get("/v1/nothing").status_code == 404
    assert memory_api.get("/v1/recommend").status_code == 405


# ------------------------------------------------------------------------------ health, metrics


def test_health_readiness_and_metrics(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"model": True, "store": True}
    api.post("/v1/recommend", json={"items": ["a"]})
    api.post("/v1/recommend", json={"k": 0, "items": ["a"]})
    text = api.get("/metrics").text
    assert 'ragrec_http_requests_total{method="POST",route="/v1/recommend",status="200"}' in text
    assert 'ragrec_http_requests_total{method="POST",route="/v1/recommend",status="422"}' in text
    assert 'ragrec_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/recommend"}' in text


# ------------------------------------------------------------------------------ store outage


@pytest.mark.redis
def test_redis_outage_degrades_and_recovers(private_redis_server: Any, run_dir: Path, ref: Reference) -> None:
    app = create_app(settings_for(run_dir, redis_url=private_redis_server.url, redis_timeout_s=0.3))
    user, item = "outage-user", ref.vocab.tokens[0]
    with LiveServer(app) as server, client_for(server) as api:
        api.post("/v1/events", json={"user_id": user, "item_id": item, "timestamp": 1})
        assert recommend(api, user_id=user)["fallback"] is None
        private_redis_server.stop()

        r = api.post("/v1/recommend", json={"user_id": user})
        assert r.status_code == 503 and "history store is unavailable" in r.json()["detail"]
        assert "127.0.0.1" not in r.text  # the backend's address stays in the log
        assert api.post("/v1/events", json={"user_id": user, "item_id": item}).status_code == 503
        assert api.get(f"/v1/users/{user}/history").status_code == 503
        assert recommend(api, items=[item])["fallback"] is None  # requests carrying their items still work
        ready = api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "degraded" and ready.json()["checks"] == {"model": True, "store": False}

        private_redis_server.start()  # same port, empty (no persistence)
        assert api.get("/readyz").status_code == 200
        assert recommend(api, user_id=user)["fallback"] == "popular"
        assert api.post("/v1/events", json={"user_id": user, "item_id": item, "timestamp": 2}).status_code == 200
        assert recommend(api, user_id=user)["fallback"] is None


# ------------------------------------------------------------------------------ micro-batching


@pytest.mark.parametrize("wait_ms", [50, 0])  # 0: no waiting, only what queued up meanwhile
def test_micro_batcher_merges_concurrent_requests(run_dir: Path, wait_ms: float) -> None:
    engine = Engine.from_run_dir(run_dir)
    toks = engine.vocab.tokens
    queries = [Query(items=toks[i: i + 3], k=5) for i in range(12)] + [Query(items=["cold"], k=3)]

    async def main() -> list[Any]:
        batcher = MicroBatcher(engine, wait_ms=wait_ms, max_size=64)
        batcher.start()
        try:
            out = await asyncio.gather(*(batcher.recommend(q) for q in queries))
        finally:
            await batcher.stop()
        assert batcher.batches_run == 1
        return out

    merged = asyncio.run(main())
    for got, q in zip(merged, queries, strict=True):
        alone = engine.recommend_batch([q])[0]
        assert (got.items, got.fallback, got.unknown_items) == (alone.items, alone.fallback, alone.unknown_items)
        assert got.scores == pytest.approx(alone.scores, rel=1e-5)  # batched matmuls round differently


def test_concurrent_http_requests_share_forward_passes(run_dir: Path, ref: Reference) -> None:
    app = create_app(settings_for(run_dir, batch_wait_ms=100))
    toks = ref.vocab.tokens
    bodies = [{"items": toks[i: i + 2], "k": 3} for i in range(16)]

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies))

    with LiveServer(app) as server:
        responses = asyncio.run(fire(server.url))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [ids_of(r.json()) for r in responses] == [ref.top(b["items"], 3, masked=set(b["items"])) for b in bodies]
    batches = app.state.batcher.batches_run
    assert batches < len(bodies)  # some requests were answered by a shared pass
    metrics = app.state.metrics
    assert metrics.registry.get_sample_value("ragrec_inference_batch_size_count") == batches
    assert metrics.registry.get_sample_value("ragrec_inference_batch_size_sum") == len(bodies)


def test_repeated_requests_are_served_from_the_cache(run_dir: Path, ref: Reference) -> None:
    app = create_app(settings_for(run_dir))
    toks, user = ref.vocab.tokens, "cache-user"
    with LiveServer(app) as server, client_for(server) as api:
        api.post("/v1/events", json={"user_id": user, "item_id": toks[0], "timestamp": 1})
        first = recommend(api, user_id=user, k=4)
        passes = app.state.batcher.batches_run
        assert recommend(api, user_id=user, k=4) == first
        assert app.state.batcher.batches_run == passes  # no forward pass for the repeat
        api.post("/v1/events", json={"user_id": user, "item_id": toks[1], "timestamp": 2})
        after = recommend(api, user_id=user, k=4)  # a new history is a new key, not a stale answer
        assert app.state.batcher.batches_run == passes + 1
        assert ids_of(after) == ref.top(toks[:2], 4, masked=set(toks[:2]))


def test_job_records_need_the_api_key(run_dir: Path) -> None:
    app = create_app(settings_for(run_dir, api_key="s3cret"))
    with LiveServer(app) as server, client_for(server) as api:
        # MemoryStore calls never wait on the loop, so the test may write a record from its own thread
        asyncio.run(app.state.store.put_job("j1", {"id": "j1", "kind": "rebuild", "state": "done"}))
        assert api.get("/v1/jobs/j1").status_code == 401
        assert api.get("/v1/jobs/j1", headers={"X-API-Key": "wrong"}).status_code == 401
        admin = {"X-API-Key": "s3cret"}
        assert api.get("/v1/jobs/j1", headers=admin).json()["state"] == "done"
        assert [j["id"] for j in api.get("/v1/jobs", headers=admin).json()] == ["j1"]
        r = api.get("/v1/jobs/nope", headers=admin)
        assert r.status_code == 404 and "no job with id 'nope'" in r.json()["detail"]
        assert api.get("/v1/jobs?limit=0", headers=admin).status_code == 422
    with LiveServer(create_app(settings_for(run_dir))) as server, client_for(server) as api:
        r = api.get("/v1/jobs/j1", headers={"X-API-Key": "anything"})
        assert r.status_code == 403 and "RAGREC_API_KEY" in r.json()["detail"]
