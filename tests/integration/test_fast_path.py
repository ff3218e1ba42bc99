"""POST /v1/recommend has two ways in: the fast path (app/routes/recommend.py: FastRecommend),
which takes a declared ``application/json`` body, and the FastAPI route, which takes every other
JSON content type and whatever the fast path hands on. The same requests must get the same
answers either way, be counted alike, and dependency overrides must still reach the route."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from app.batcher import MicroBatcher
from app.deps import get_batcher
from app.main import create_app
from app.settings import Settings
from training.data.sequences import Vocabulary

pytestmark = pytest.mark.slow  # a retrieval run trained (session fixture) and its app started

FAST, ROUTE = "application/json", "application/vnd.ragrec+json"  # FastAPI parses both as JSON


def _bodies(items: list[str]) -> list[dict]:
    return [
        {"items": items[:6], "k": 5},
        {"items": items[3:12], "k": 4, "explain": True},
        {"items": items[:6], "k": 5, "use_retrieval": False, "explain": True},
        {"items": [*items[:3], "no-such-item"], "k": 3, "exclude_items": [items[5]]},
        {"items": ["no-such-item"], "k": 3},
        {"user_id": "fast-path-user", "k": 7},  # the stored events below
        {"user_id": "fast-path-user", "items": items[20:23], "exclude_seen": False, "k": 7},
        {"user_id": "nobody", "k": 2},  # no history: the popular fallback
        {"items": items[:3], "k": "4", "use_retrieval": "yes"},  # lax values, accepted by both
        {"items": items[:3], "k": 0},  # 422s and their messages
        {"items": [], "k": 3},
        {"items": items[:3], "exclude_seen_items": True},
    ]


def _serve(ra_run: Path, index_dir: Path, content_type: str, items: list[str]) -> tuple[list[httpx.Response], str]:
    """The answers of a fresh app to every body (sent with ``content_type``) and its /metrics."""
    app = create_app(Settings(run_dir=ra_run, index_dir=index_dir))

    async def run() -> tuple[list[httpx.Response], str]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            events = [{"user_id": "fast-path-user", "item_id": item, "timestamp": 100 + j}
                      for j, item in enumerate(items[30:34])]
            assert (await client.post("/v1/events", json=events)).status_code == 200
            out = [await client.post("/v1/recommend", content=json.dumps(b).encode(),
                                     headers={"content-type": content_type}) for b in _bodies(items)]
            return out, (await client.get("/metrics")).text

    return asyncio.run(run())


def test_both_ways_in_answer_alike(ra_run: Path, tmp_path: Path) -> None:
    items = Vocabulary.load(ra_run / "items.json").tokens
    fast, fast_metrics = _serve(ra_run, tmp_path / "index", FAST, items)
    route, route_metrics = _serve(ra_run, tmp_path / "index", ROUTE, items)  # the same index version
    assert [r.status_code for r in fast] == [200] * 9 + [422] * 3
    for a, b in zip(fast, route, strict=True):
        assert (a.status_code, a.headers["content-type"], a.json()) == (b.status_code, b.headers["content-type"],
                                                                        b.json())
    assert fast[5].json()["items"] and fast[7].json()["fallback"] == "popular"
    assert fast[1].json()["explanation"]["neighbours"]  # retrieval evidence came through the fast path

    def counted(text: str) -> dict[str, float]:
        return {m[0]: float(m[1]) for m in re.findall(
            r'ragrec_http_requests_total\{method="POST",route="/v1/recommend",status="(\d+)"\} (\S+)', text)}

    assert counted(fast_metrics) == counted(route_metrics) == {"200": 9.0, "422": 3.0}


def test_a_dependency_override_still_reaches_the_route(ra_run: Path, tmp_path: Path) -> None:
    app = create_app(Settings(run_dir=ra_run, index_dir=tmp_path / "index"))
    items = Vocabulary.load(ra_run / "items.json").tokens

    async def run() -> tuple[int, int, int]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            other = MicroBatcher(app.state.engine)  # a second real batcher on the same engine
            other.start()
            app.dependency_overrides[get_batcher] = lambda: other
            try:
                r = await client.post("/v1/recommend", json={"items": items[:5], "k": 3})
            finally:
                app.dependency_overrides.clear()
                await other.stop()
            return r.status_code, other.batches_run, app.state.batcher.batches_run

    status, by_override, by_service = asyncio.run(run())
    assert (status, by_override, by_service) == (200, 1, 0)
