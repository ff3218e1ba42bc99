"""The fast path of POST /v1/recommend (app/routes/recommend.py: FastRecommend) validates the raw
body with ``RecommendRequest.model_validate_json``; the route validates what FastAPI parsed with
``json.loads``. The fast path may refuse more (it then hands the request to the route), never
less: whatever it accepts, the route must accept as the same request."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from app.routes.recommend import _json_body
from app.schemas import RecommendRequest

WEIRD = [None, True, False, 0, 1, 2, -1, 5.0, 5.5, 1e400, float("nan"), float("-inf"), 2**70, "", "5", "ten", "yes",
         "true", "off", "a" * 300, "\u00e9\u4e2d", "\x00", [], ["a"], [""], [1], ["a", None], {}, {"a": 1}, [[]]]
FIELDS = ["user_id", "items", "k", "use_retrieval", "exclude_seen", "exclude_items", "explain"]


def _bodies(n: int, seed: int) -> list[dict]:
    """Valid requests with 0-2 mutations each: a field set to an odd value (of the right or a wrong
    kind), dropped, or an unknown key added; about half stay valid."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body: dict = {"items": [rng.choice(["1", "a", "\u00e9", "x" * 256]) for _ in range(rng.randint(1, 4))]}
        for name, value in (("user_id", "u1"), ("k", rng.randint(1, 1000)), ("use_retrieval", rng.random() < .5),
                            ("exclude_seen", rng.random() < .5), ("exclude_items", ["b"]), ("explain", False)):
            if rng.random() < 0.4:
                body[name] = value
        for _ in range(rng.choice([0, 0, 1, 2])):
            what = rng.random()
            if what < 0.8:
                body[rng.choice(FIELDS)] = rng.choice(WEIRD)
            elif what < 0.9:
                body.pop(rng.choice(FIELDS), None)
            else:
                body[rng.choice(["exclude_seen_items", "K", ""])] = rng.choice(WEIRD)
        out.append(body)
    return out


def _route(raw: bytes) -> RecommendRequest | None:
    try:
        return RecommendRequest.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def _fast(raw: bytes) -> RecommendRequest | None:
    try:
        return RecommendRequest.model_validate_json(raw)
    except ValidationError:
        return None


def _same(raw: bytes) -> None:
    fast = _fast(raw)
    if fast is not None:
        assert _route(raw) == fast, raw


def test_what_the_fast_path_accepts_the_route_accepts_alike() -> None:
    bodies = _bodies(3000, seed=0)
    accepted = 0
    for body in bodies:
        for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()):  # NaN too
            _same(raw)
            accepted += _fast(raw) is not None
    assert 0.2 * len(bodies) < accepted / 2 < 0.8 * len(bodies)  # valid and invalid ones both well represented


@pytest.mark.parametrize("raw", [
    b'{"items": ["a"], "k": true}', b'{"items": ["a"], "k": "5"}', b'{"items": ["a"], "k": 5.0}',
    b'{"items": ["a"], "k": 5.5}', b'{"items": ["a"], "k": 1e400}', b'{"items": ["a"], "k": NaN}',
    b'{"items": ["a"], "items": ["b"]}', b'\xef\xbb\xbf{"items": ["a"]}', b'{"items": ["\\ud800"]}',
    b'{"items": ["\xff"]}', b'{"items": ["a"]}x', b'{"items": ["a"]} ', b'{"items": ["a"], "use_retrieval": "yes"}',
    b'{"user_id": null, "items": []}', b'{"user_id": "u"}', b"[]", b"null", b"", b'"{}"',
    '{"items": ["\u00e9\u4e2d"]}'.encode("utf-16"), b'{"items": ["' + b"a" * 257 + b'"]}',
])
def test_edge_cases_alike(raw: bytes) -> None:
    _same(raw)


def test_only_a_declared_json_body_takes_the_fast_path() -> None:
    assert _json_body([(b"content-type", b"application/json")])
    assert _json_body([(b"host", b"x"), (b"content-type", b"Application/JSON; charset=utf-8")])
    # FastAPI parses these as JSON too; the route answers them (the fast path keeps to the common case)
    assert not _json_body([(b"content-type", b"application/vnd.ragrec+json")])
    assert not _json_body([(b"content-type", b"text/plain")])
    assert not _json_body([])  # FastAPI's strict content type: no header, no JSON
