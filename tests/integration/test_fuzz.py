"""Schemathesis against the live service's OpenAPI schema: generated requests (valid and
invalid) to every operation, admin ones with the key, sent over real HTTP; none may get a 5xx.

Hypothesis drives schemathesis' strategies directly (one `given` per operation) rather than the
pytest plugin, so the live server is an ordinary fixture.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from app.main import create_app
from app.settings import Settings
from tests.support import LiveServer

EXAMPLES = 100  # per operation: the schema has 14, so well over 1,000 requests in all


@pytest.mark.slow
def test_generated_requests_never_get_a_server_error(ra_run: Path, tmp_path: Path) -> None:
    app = create_app(Settings(run_dir=ra_run, index_dir=tmp_path / "index", api_key="k", max_batch=8,
                              max_events=50, max_eval_sequences=50))
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    with LiveServer(app) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        for op in operations:

            @given(case=op.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fire(case) -> None:
                try:
                    response = case.call(base_url=server.url, headers={"X-API-Key": "k"}, timeout=30)
                except httpx.HTTPError as e:  # a dropped connection is as bad as a 500
                    failures.append(f"{case.method} {case.formatted_path}: {e!r}")
                    return
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r}: {response.status_code} "
                                    f"{response.text[:200]}")

            fire()
    assert sum(statuses.values()) >= 1000, statuses
    assert not failures, failures[:5]
    assert any(code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses), statuses
