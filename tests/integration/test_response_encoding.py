"""The recommend routes write their JSON directly (app/routes/recommend.py, no response-model
re-validation): every kind of answer must still be exactly what the declared pydantic models
give for the same values."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.schemas import BatchRecommendResponse, RecommendResponse
from app.settings import Settings
from training.data.sequences import Vocabulary

pytestmark = pytest.mark.slow  # a retrieval run trained (session fixture) and its app started


def _answers(ra_run: Path, index_dir: Path, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """POST each (path, body) in order to the app, in process, with its lifespan run (model, store,
    first index build)."""
    app = create_app(Settings(run_dir=ra_run, index_dir=index_dir))

    async def run() -> list[httpx.Response]:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            return [await client.post(path, json=body) for path, body in requests]

    return asyncio.run(run())


def _same_as_the_model(raw: str, model: type) -> dict:
    """The answer parses as ``model`` and re-encoding the parsed model gives the same document
    (no missing, extra or differently typed field)."""
    body = json.loads(raw)
    assert json.loads(model.model_validate(body).model_dump_json()) == body
    return body


def test_every_kind_of_answer_matches_its_declared_model(ra_run: Path, tmp_path: Path) -> None:
    items = Vocabulary.load(ra_run / "items.json").tokens
    bodies = [
        {"items": items[:6], "k": 5},
        {"items": items[3:12], "k": 4, "explain": True},  # neighbours, contributions, fusion summary
        {"items": items[:6], "k": 5, "use_retrieval": False, "explain": True},  # explanation without neighbours
        {"items": [*items[:3], "no-such-item"], "k": 3, "exclude_items": [items[5]]},  # unknown_items
        {"items": ["no-such-item"], "k": 3},  # nothing known: the popular fallback
    ]
    replies = _answers(ra_run, tmp_path / "index", [("/v1/recommend", b) for b in bodies]
                       + [("/v1/recommend", bodies[1]), ("/v1/recommend/batch", {"requests": bodies}),
                          ("/v1/recommend", {"items": ["1"], "k": 0})])
    answers = []
    for r in replies[: len(bodies)]:
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        answers.append(_same_as_the_model(r.text, RecommendResponse))
    explained = answers[1]["explanation"]
    assert answers[1]["retrieval_used"] and explained["neighbours"] and explained["fusion"]["kind"] == "vote"
    assert answers[2]["explanation"]["neighbours"] == [] and not answers[2]["retrieval_used"]
    assert answers[3]["unknown_items"] == ["no-such-item"]
    assert items[5] not in [i["item_id"] for i in answers[3]["items"]]
    assert answers[4]["fallback"] == "popular" and answers[0]["fallback"] is None
    assert replies[len(bodies)].json() == answers[1]  # a cache hit: the same answer

    batch, invalid = replies[-2], replies[-1]
    assert batch.status_code == 200
    results = _same_as_the_model(batch.text, BatchRecommendResponse)["results"]
    for one, alone in zip(results, answers, strict=True):  # one forward pass for all: float noise only
        assert [i["item_id"] for i in one["items"]] == [i["item_id"] for i in alone["items"]]
        assert [i["score"] for i in one["items"]] == pytest.approx([i["score"] for i in alone["items"]], rel=1e-4)
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["loc"] == "body.k"  # validation as before
