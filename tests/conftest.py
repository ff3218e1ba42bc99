"""Shared fixtures: a real redis-server on a free port (skipped only if the binary is absent)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer, redis_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests isolate themselves with key prefixes."""
    server = RedisServer(redis_binary(), "127.0.0.1", tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis_server(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop and restart it (same port)."""
    server = RedisServer(redis_binary(), "127.0.0.1", tmp_path)
    server.start()
    yield server
    server.stop()
