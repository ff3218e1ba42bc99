"""One suite, both stores: MemoryStore and RedisStore against a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from app.store import Event, MemoryStore, RedisStore, Store, StoreUnavailable, make_store
from tests.support import FakeClock, wait_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture
def run() -> Iterator[Run]:
    """One event loop per test: the store is created, used and closed on it."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture
def clock() -> FakeClock:
    """The in-process store's clock; Redis keeps its own time (see ``let_expire``)."""
    return FakeClock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def open_store(request: pytest.FixtureRequest, run: Run, clock: FakeClock) -> Iterator[Callable[..., Store]]:
    """Factory for stores of the parametrised backend; all are closed after the test."""
    opened: list[Store] = []

    def open_(**kw: Any) -> Store:
        if request.param == "redis":
            url = request.getfixturevalue("redis_server").url
            store: Store = RedisStore.from_url(url, prefix=f"test-{uuid.uuid4().hex}", **kw)
        else:
            store = MemoryStore(clock=clock, **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        run(store.close())


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    return open_store()


def ev(user: str, item: str, ts: float) -> Event:
    return Event(user, item, ts)


def let_expire(store: Store, clock: FakeClock, seconds: float, expired: Callable[[], bool]) -> None:
    """Let ``seconds`` pass for the store: the in-process store's clock jumps; Redis expires
    keys on its own clock, so wait (up to 10 s, no fixed margin) until ``expired()`` holds."""
    if isinstance(store, MemoryStore):
        clock.advance(seconds)
    assert wait_until(expired), "the entry did not expire"


def test_history_in_time_order_with_ties_in_arrival_order(store: Store, run: Run) -> None:
    run(store.append_events([ev("u", "c", 30), ev("u", "a", 10), ev("u", "tie-1", 20)], max_len=50))
    res = run(store.append_events([ev("u", "tie-2", 20), ev("u", "early", 5.5), ev("u", "x:é/1", 20)], max_len=50))
    assert (res.accepted, res.duplicates) == (3, 0)
    assert run(store.history("u")) == [
        ("early", 5.5), ("a", 10.0), ("tie-1", 20.0), ("tie-2", 20.0), ("x:é/1", 20.0), ("c", 30.0)]


def test_events_for_several_users_in_one_call(store: Store, run: Run) -> None:
    run(store.append_events([ev("u1", "a", 1), ev("u2", "b", 2), ev("u1", "c", 3)], max_len=10))
    assert run(store.history("u1")) == [("a", 1.0), ("c", 3.0)]
    assert run(store.history("u2")) == [("b", 2.0)]


def test_unknown_user_has_empty_history(store: Store, run: Run) -> None:
    assert run(store.history("nobody")) == []


def test_users_lists_everyone_with_a_history(store: Store, run: Run) -> None:
    assert run(store.users()) == []
    names = ["u1", "user:{odd}/é", "42"]
    run(store.append_events([ev(n, "a", 1) for n in names] + [ev("u1", "b", 2)], max_len=10))
    assert sorted(run(store.users())) == sorted(names)


def test_history_capped_to_newest(store: Store, run: Run) -> None:
    run(store.append_events([ev("u", f"i{t}", t) for t in range(6)], max_len=4))
    assert [item for item, _ in run(store.history("u"))] == ["i2", "i3", "i4", "i5"]
    # an event older than everything kept is stored, then capped away at once
    res = run(store.append_events([ev("u", "old", -1)], max_len=4))
    assert res.accepted == 1
    assert [item for item, _ in run(store.history("u"))] == ["i2", "i3", "i4", "i5"]
    run(store.append_events([ev("u", "new", 99)], max_len=4))
    assert [item for item, _ in run(store.history("u"))] == ["i3", "i4", "i5", "new"]


def test_duplicate_events_ignored(store: Store, run: Run) -> None:
    res = run(store.append_events([ev("u", "a", 1), ev("u", "a", 1), ev("u", "b", 2)], max_len=10))
    assert (res.accepted, res.duplicates) == (2, 1)
    # an int timestamp equal to a stored float is the same event; same item at another time is not
    res = run(store.append_events([Event("u", "a", 1), ev("u", "a", 3), ev("other", "a", 1)], max_len=10))
    assert (res.accepted, res.duplicates) == (2, 1)
    assert run(store.history("u")) == [("a", 1.0), ("b", 2.0), ("a", 3.0)]
    assert run(store.history("other")) == [("a", 1.0)]


def test_concurrent_appends_for_one_user_lose_nothing(store: Store, run: Run) -> None:
    n_tasks, per_task = 40, 5

    async def writer(t: int) -> None:
        await store.append_events([ev("hot", f"t{t}-{i}", t * per_task + i) for i in range(per_task)], max_len=1000)

    async def main() -> None:
        await asyncio.gather(*(writer(t) for t in range(n_tasks)))

    run(main())
    expected = [(f"t{t}-{i}", float(t * per_task + i)) for t in range(n_tasks) for i in range(per_task)]
    assert run(store.history("hot")) == expected


def test_cache_keyed_by_index_version_and_expires(store: Store, run: Run, clock: FakeClock) -> None:
    run(store.cache_set("rec:u1", "v1", b"\x00payload", ttl_s=0.3))
    assert run(store.cache_get("rec:u1", "v1")) == b"\x00payload"
    assert run(store.cache_get("rec:u1", "v2")) is None
    assert run(store.cache_get("rec:other", "v1")) is None
    assert run(store.cache_get("u1", "v1:rec")) is None  # no confusion when names contain separators
    run(store.cache_set("rec:u1", "v2", b"fresh", ttl_s=30))
    assert run(store.cache_get("rec:u1", "v1")) == b"\x00payload"
    if isinstance(store, MemoryStore):
        clock.advance(0.29)  # not yet
        assert run(store.cache_get("rec:u1", "v1")) == b"\x00payload"
    let_expire(store, clock, 0.02, lambda: run(store.cache_get("rec:u1", "v1")) is None)
    assert run(store.cache_get("rec:u1", "v2")) == b"fresh"


def test_lock_exclusive_and_owner_only(store: Store, run: Run) -> None:
    assert run(store.acquire_lock("rebuild", "a", ttl_s=30))
    assert not run(store.acquire_lock("rebuild", "b", ttl_s=30))
    assert run(store.acquire_lock("rebuild", "a", ttl_s=30))  # holder re-acquires (safe retry)
    assert run(store.acquire_lock("other-lock", "b", ttl_s=30))
    assert not run(store.release_lock("rebuild", "b"))
    assert not run(store.extend_lock("rebuild", "b", ttl_s=30))
    assert run(store.release_lock("rebuild", "a"))
    assert not run(store.release_lock("rebuild", "a"))
    assert run(store.acquire_lock("rebuild", "b", ttl_s=30))


def test_lock_expires_unless_extended(store: Store, run: Run, clock: FakeClock) -> None:
    assert run(store.acquire_lock("expiring", "a", ttl_s=0.2))
    assert run(store.acquire_lock("extended", "a", ttl_s=0.2))
    assert run(store.extend_lock("extended", "a", ttl_s=30))
    if isinstance(store, MemoryStore):
        clock.advance(0.19)  # not yet: another owner is refused
        assert not run(store.acquire_lock("expiring", "b", ttl_s=30))
    let_expire(store, clock, 0.02, lambda: run(store.acquire_lock("expiring", "b", ttl_s=30)))
    assert not run(store.extend_lock("expiring", "a", ttl_s=5))  # a's lock is gone, b holds it now
    assert not run(store.release_lock("expiring", "a"))
    assert not run(store.acquire_lock("extended", "b", ttl_s=5))  # the extended lock is still a's


def test_index_version_round_trip(store: Store, run: Run) -> None:
    assert run(store.get_index_version()) is None
    run(store.set_index_version("idx-001"))
    run(store.set_index_version("idx-002"))
    assert run(store.get_index_version()) == "idx-002"


def test_job_records_round_trip(open_store: Callable[..., Store], run: Run) -> None:
    store = open_store(max_jobs=3)
    assert run(store.get_job("missing")) is None
    assert run(store.list_jobs()) == []
    record = {"id": "j1", "kind": "rebuild", "status": "queued", "metrics": {"recall": 0.98}, "tags": ["a"]}
    run(store.put_job("j1", record))
    assert run(store.get_job("j1")) == record
    run(store.put_job("j2", {"id": "j2"}))
    run(store.put_job("j1", {**record, "status": "done"}))  # an update keeps the creation order
    run(store.put_job("j3", {"id": "j3"}))
    assert [j["id"] for j in run(store.list_jobs())] == ["j3", "j2", "j1"]
    assert [j["id"] for j in run(store.list_jobs(limit=2))] == ["j3", "j2"]
    assert run(store.get_job("j1"))["status"] == "done"
    run(store.put_job("j4", {"id": "j4"}))  # past max_jobs: the oldest goes
    assert run(store.get_job("j1")) is None
    assert [j["id"] for j in run(store.list_jobs())] == ["j4", "j3", "j2"]


def test_ping(store: Store, run: Run) -> None:
    assert run(store.ping()) is True


def test_bad_arguments_raise_value_error(store: Store, run: Run) -> None:
    with pytest.raises(ValueError, match="max_len"):
        run(store.append_events([ev("u", "a", 1)], max_len=0))
    with pytest.raises(ValueError, match="ttl_s"):
        run(store.cache_set("k", "v1", b"x", ttl_s=0))
    with pytest.raises(ValueError, match="ttl_s"):
        run(store.acquire_lock("l", "a", ttl_s=-1))
    with pytest.raises(ValueError, match="timestamp"):
        ev("u", "a", float("nan"))
    with pytest.raises(ValueError, match="non-empty"):
        ev("", "a", 1)


def test_make_store_picks_backend(run: Run) -> None:
    store = make_store(None)
    assert isinstance(store, MemoryStore)
    run(store.close())
    store = make_store("redis://127.0.0.1:1/0", prefix="unused")
    assert isinstance(store, RedisStore)
    run(store.close())


@pytest.mark.redis
def test_redis_restart_is_invisible_to_the_next_call(private_redis_server: Any, run: Run) -> None:
    store = RedisStore.from_url(private_redis_server.url, prefix="restart")
    try:
        assert run(store.ping()) is True  # leaves a pooled connection that the restart breaks
        private_redis_server.stop()
        private_redis_server.start()
        run(store.append_events([ev("u", "a", 1)], max_len=10))
        assert run(store.history("u")) == [("a", 1.0)]
    finally:
        run(store.close())


@pytest.mark.redis
def test_redis_down_fails_fast_then_recovers(private_redis_server: Any, run: Run) -> None:
    store = RedisStore.from_url(private_redis_server.url, prefix="outage")
    try:
        run(store.append_events([ev("u", "a", 1)], max_len=10))
        assert run(store.history("u")) == [("a", 1.0)]

        private_redis_server.stop()
        calls = [lambda: store.history("u"), lambda: store.append_events([ev("u", "b", 2)], max_len=10),
                 lambda: store.cache_get("k", "v1"), lambda: store.acquire_lock("rebuild", "a", ttl_s=5),
                 lambda: store.get_job("j")]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="redis"):
                run(call())
            assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert run(store.ping()) is False
        assert time.monotonic() - started < 2.0

        private_redis_server.start()  # same port, empty (no persistence)
        assert run(store.ping()) is True
        assert run(store.history("u")) == []
        run(store.append_events([ev("u", "c", 3)], max_len=10))  # scripts are reloaded by themselves
        assert run(store.history("u")) == [("c", 3.0)]
    finally:
        run(store.close())


def test_memory_cache_stays_bounded_evicting_expired_then_oldest(run: Run, clock: FakeClock) -> None:
    """MemoryStore's answer cache at its size limit: expired entries go first, then the oldest live
    ones; every insert keeps it at the limit (and costs O(1): it no longer rescans the whole cache)."""
    store = MemoryStore(clock=clock, max_cache_entries=4)
    for i in range(4):
        run(store.cache_set(f"k{i}", "v1", b"x", 10.0))
        clock.advance(1.0)
    run(store.cache_set("k4", "v1", b"x", 10.0))  # full: the oldest live entry (k0) makes room
    assert [run(store.cache_get(f"k{i}", "v1")) for i in range(5)] == [None, b"x", b"x", b"x", b"x"]
    clock.advance(8.5)  # k1 (written at t=1) and k2 (t=2) have expired by t=12.5
    run(store.cache_set("k5", "v1", b"y", 10.0))
    assert run(store.cache_get("k5", "v1")) == b"y" and run(store.cache_get("k3", "v1")) == b"x"
    for i in range(6, 1006):  # a long stream into a full cache keeps the newest 4
        run(store.cache_set(f"k{i}", "v1", b"z", 10.0))
    kept = [i for i in range(1006) if run(store.cache_get(f"k{i}", "v1")) is not None]
    assert kept == [1002, 1003, 1004, 1005]
