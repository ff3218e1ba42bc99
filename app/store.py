"""Service state: user histories, result cache, rebuild lock, index version, job records.

One interface (`Store`), two implementations:

- `MemoryStore`: the embedded default, one process only. Every method mutates its dicts without
  awaiting in between, so on one event loop each call is atomic without a lock.
- `RedisStore`: shared by every replica. Appends and lock operations are Lua scripts, so they are
  atomic across clients. Socket timeouts are short so that a dead Redis fails fast with
  `StoreUnavailable` (the API answers 503); the client reconnects by itself when Redis returns.

Both behave the same; tests/integration/test_store.py runs one suite against both.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The backend is down or timed out; the API maps this to 503. The message names the backend."""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float

    def __post_init__(self) -> None:
        if not self.user_id or not self.item_id:
            raise ValueError(f"user_id and item_id must be non-empty, got {self.user_id!r}, {self.item_id!r}")
        if not math.isfinite(self.timestamp):
            raise ValueError(f"timestamp must be a finite number, got {self.timestamp!r}")


@dataclass(frozen=True)
class AppendResult:
    accepted: int  # events newly stored (an accepted event may already have been capped away)
    duplicates: int  # events whose (user, item, timestamp) was already in the history


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def group_by_user(events: Sequence[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        groups[e.user_id].append(e)
    return groups


class Store(ABC):
    """What the service keeps between requests. All methods are coroutines."""

    @abstractmethod
    async def append_events(self, events: Sequence[Event], max_len: int) -> AppendResult:
        """Add events to their users' histories, kept sorted by (timestamp, arrival order) and capped
        to the newest `max_len`. An event equal to one already stored is counted as a duplicate."""

    @abstractmethod
    async def history(self, user_id: str) -> list[tuple[str, float]]:
        """(item_id, timestamp) pairs, oldest first; [] for an unknown user."""

    @abstractmethod
    async def users(self) -> list[str]:
        """Every user with a stored history (for index rebuilds), in no particular order."""

    @abstractmethod
    async def cache_get(self, key: str, index_version: str) -> bytes | None: ...

    @abstractmethod
    async def cache_set(self, key: str, index_version: str, value: bytes, ttl_s: float) -> None:
        """Entries written under one index version are never returned for another."""

    @abstractmethod
    async def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` now holds the lock for `ttl_s`. Re-acquiring by the holder refreshes the
        expiry, which makes a retried acquire safe."""

    @abstractmethod
    async def release_lock(self, name: str, owner: str) -> bool:
        """True if `owner` held the lock and it is now released."""

    @abstractmethod
    async def extend_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` holds the lock; its expiry is then reset to `ttl_s` from now."""

    @abstractmethod
    async def get_index_version(self) -> str | None: ...

    @abstractmethod
    async def set_index_version(self, version: str) -> None: ...

    @abstractmethod
    async def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        """Create or replace a job record (must be JSON-serialisable); the oldest beyond the limit go."""

    @abstractmethod
    async def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Job records, most recently created first."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers; for /readyz. Never raises."""

    @abstractmethod
    async def close(self) -> None: ...


class MemoryStore(Store):
    """In-process store. TTLs use `clock` (monotonic seconds); caches and jobs are bounded."""

    def __init__(self, *, max_cache_entries: int = 10_000, max_jobs: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        _check_positive("max_cache_entries", max_cache_entries)
        _check_positive("max_jobs", max_jobs)
        self._clock = clock
        self._max_cache_entries = max_cache_entries
        self._max_jobs = max_jobs
        self._histories: dict[str, list[tuple[float, int, str]]] = {}  # user -> sorted (ts, arrival, item)
        self._seen: dict[str, set[tuple[str, float]]] = {}  # user -> {(item, ts)} currently stored
        self._arrivals = 0
        self._cache: dict[tuple[str, str], tuple[float, bytes]] = {}  # (version, key) -> (expires, value)
        self._locks: dict[str, tuple[str, float]] = {}  # name -> (owner, expires)
        self._index_version: str | None = None
        self._jobs: dict[str, str] = {}  # id -> JSON, in creation order

    async def append_events(self, events: Sequence[Event], max_len: int) -> AppendResult:
        _check_positive("max_len", max_len)
        accepted = duplicates = 0
        for user_id, user_events in group_by_user(events).items():
            hist = self._histories.setdefault(user_id, [])
            seen = self._seen.setdefault(user_id, set())
            for e in user_events:
                ts = float(e.timestamp)
                if (e.item_id, ts) in seen:
                    duplicates += 1
                    continue
                self._arrivals += 1
                bisect.insort(hist, (ts, self._arrivals, e.item_id))
                seen.add((e.item_id, ts))
                accepted += 1
            if len(hist) > max_len:
                for ts, _, item in hist[: len(hist) - max_len]:
                    seen.discard((item, ts))
                del hist[: len(hist) - max_len]
        return AppendResult(accepted, duplicates)

    async def history(self, user_id: str) -> list[tuple[str, float]]:
        return [(item, ts) for ts, _, item in self._histories.get(user_id, [])]

    async def users(self) -> list[str]:
        return [user for user, hist in self._histories.items() if hist]

    async def cache_get(self, key: str, index_version: str) -> bytes | None:
        entry = self._cache.get((index_version, key))
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._cache[(index_version, key)]
            return None
        return entry[1]

    async def cache_set(self, key: str, index_version: str, value: bytes, ttl_s: float) -> None:
        _check_positive("ttl_s", ttl_s)
        now = self._clock()
        self._cache.pop((index_version, key), None)  # re-insert at the end: dict order is age order
        # Oldest first (dict order): drop expired entries from the front, then the oldest live ones
        # while the cache is full. Amortised O(1) per insert; a full scan per insert of a full cache
        # cost ~0.5 ms at 10,000 entries, most of a recommendation's CPU (bench/serve_load.py, py-spy).
        while self._cache:
            oldest = next(iter(self._cache))
            if self._cache[oldest][0] > now and len(self._cache) < self._max_cache_entries:
                break
            del self._cache[oldest]
        self._cache[(index_version, key)] = (now + ttl_s, bytes(value))

    def _lock_holder(self, name: str) -> str | None:
        entry = self._locks.get(name)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        _check_positive("ttl_s", ttl_s)
        if self._lock_holder(name) not in (None, owner):
            return False
        self._locks[name] = (owner, self._clock() + ttl_s)
        return True

    async def release_lock(self, name: str, owner: str) -> bool:
        if self._lock_holder(name) != owner:
            return False
        del self._locks[name]
        return True

    async def extend_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        _check_positive("ttl_s", ttl_s)
        if self._lock_holder(name) != owner:
            return False
        self._locks[name] = (owner, self._clock() + ttl_s)
        return True

    async def get_index_version(self) -> str | None:
        return self._index_version

    async def set_index_version(self, version: str) -> None:
        self._index_version = version

    async def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        self._jobs[job_id] = json.dumps(record)  # stored as JSON so both stores return equal copies
        while len(self._jobs) > self._max_jobs:
            del self._jobs[next(iter(self._jobs))]

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        raw = self._jobs.get(job_id)
        return None if raw is None else json.loads(raw)

    async def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        _check_positive("limit", limit)
        return [json.loads(raw) for raw in list(reversed(self._jobs.values()))[:limit]]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


# History layout in Redis, per user: a sorted set scored by timestamp whose members are
# "<arrival:016d>:<ts repr>:<item>" (equal scores sort by member, i.e. by arrival), a set of
# "<ts repr>:<item>" for duplicate checks, and an arrival counter. Hash tags keep a user's three
# keys in one cluster slot, as a script touching them requires.
_APPEND = """
local max_len = tonumber(ARGV[1])
local accepted, duplicates = 0, 0
for i = 2, #ARGV, 2 do
  local field = ARGV[i] .. ':' .. ARGV[i + 1]
  if redis.call('SADD', KEYS[2], field) == 1 then
    local arrival = redis.call('INCR', KEYS[3])
    redis.call('ZADD', KEYS[1], ARGV[i], string.format('%016d', arrival) .. ':' .. field)
    accepted = accepted + 1
  else
    duplicates = duplicates + 1
  end
end
local excess = redis.call('ZCARD', KEYS[1]) - max_len
if excess > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
    redis.call('SREM', KEYS[2], string.sub(member, 18))
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
return {accepted, duplicates}
"""

_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: order zset (score = creation counter), data hash, counter. ARGV: id, JSON, max jobs.
_PUT_JOB = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if excess > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do redis.call('HDEL', KEYS[2], id) end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
return 1
"""


def _ms(ttl_s: float) -> int:
    _check_positive("ttl_s", ttl_s)
    return max(1, round(ttl_s * 1000))


class RedisStore(Store):
    """Redis-backed store shared by replicas. Every key starts with `prefix:`.

    Retried commands are safe: an append retried after a lost reply finds its events already
    stored (counted as duplicates), and a retried acquire by the holder succeeds.
    """

    def __init__(self, client: Any, *, prefix: str = "ragrec", max_jobs: int = 1000) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        _check_positive("max_jobs", max_jobs)
        self._redis = client  # redis.asyncio.Redis, decode_responses=False
        self._prefix = prefix
        self._max_jobs = max_jobs
        self._down_errors = (RedisConnectionError, RedisTimeoutError, OSError)
        kw = client.connection_pool.connection_kwargs
        self._where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
        self._append = client.register_script(_APPEND)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)
        self._put_job = client.register_script(_PUT_JOB)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.5, prefix: str = "ragrec",
                 max_jobs: int = 1000) -> RedisStore:
        """Client with short timeouts and one immediate retry: the retry replaces a connection that
        a Redis restart broke, so the first call after recovery succeeds."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        _check_positive("timeout_s", timeout_s)
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                         retry=Retry(NoBackoff(), 1))
        return cls(client, prefix=prefix, max_jobs=max_jobs)

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        try:
            yield
        except self._down_errors as e:
            raise StoreUnavailable(f"redis at {self._where} unavailable during {op}: {e}") from e

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _history_keys(self, user_id: str) -> list[str]:
        return [self._key(kind, "{" + user_id + "}") for kind in ("hist", "seen", "arrivals")]

    async def append_events(self, events: Sequence[Event], max_len: int) -> AppendResult:
        _check_positive("max_len", max_len)
        groups = group_by_user(events)
        if not groups:
            return AppendResult(0, 0)
        with self._guard("append_events"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id, user_events in groups.items():
                    args: list[Any] = [max_len]
                    for e in user_events:
                        args += [repr(float(e.timestamp)), e.item_id]
                    await self._append(keys=self._history_keys(user_id), args=args, client=pipe)
                replies = await pipe.execute()
        return AppendResult(sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies))

    async def history(self, user_id: str) -> list[tuple[str, float]]:
        with self._guard("history"):
            members = await self._redis.zrange(self._history_keys(user_id)[0], 0, -1)
        out = []
        for member in members:
            ts, item = member.decode()[17:].split(":", 1)
            out.append((item, float(ts)))
        return out

    async def users(self) -> list[str]:
        pattern = self._key("hist", "*")
        skip = len(self._key("hist", "{"))
        with self._guard("users"):
            keys = [key async for key in self._redis.scan_iter(match=pattern, count=1000)]
        return [key.decode()[skip:-1] for key in keys]  # "<prefix>:hist:{<user>}" -> user

    def _cache_key(self, key: str, index_version: str) -> str:
        # the length prefix keeps ("a:b", "c") and ("a", "b:c") apart
        return self._key("cache", str(len(index_version)), index_version, key)

    async def cache_get(self, key: str, index_version: str) -> bytes | None:
        with self._guard("cache_get"):
            return await self._redis.get(self._cache_key(key, index_version))

    async def cache_set(self, key: str, index_version: str, value: bytes, ttl_s: float) -> None:
        with self._guard("cache_set"):
            await self._redis.set(self._cache_key(key, index_version), value, px=_ms(ttl_s))

    async def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        with self._guard("acquire_lock"):
            return bool(await self._acquire(keys=[self._key("lock", name)], args=[owner, _ms(ttl_s)]))

    async def release_lock(self, name: str, owner: str) -> bool:
        with self._guard("release_lock"):
            return bool(await self._release(keys=[self._key("lock", name)], args=[owner]))

    async def extend_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        with self._guard("extend_lock"):
            return bool(await self._extend(keys=[self._key("lock", name)], args=[owner, _ms(ttl_s)]))

    async def get_index_version(self) -> str | None:
        with self._guard("get_index_version"):
            raw = await self._redis.get(self._key("index_version"))
        return None if raw is None else raw.decode()

    async def set_index_version(self, version: str) -> None:
        with self._guard("set_index_version"):
            await self._redis.set(self._key("index_version"), version)

    def _job_keys(self) -> list[str]:
        return [self._key("jobs", "order"), self._key("jobs", "data"), self._key("jobs", "created")]

    async def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        raw = json.dumps(record)
        with self._guard("put_job"):
            await self._put_job(keys=self._job_keys(), args=[job_id, raw, self._max_jobs])

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._guard("get_job"):
            raw = await self._redis.hget(self._key("jobs", "data"), job_id)
        return None if raw is None else json.loads(raw)

    async def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        _check_positive("limit", limit)
        order_key, data_key, _ = self._job_keys()
        with self._guard("list_jobs"):
            ids = await self._redis.zrevrange(order_key, 0, limit - 1)
            raws = await self._redis.hmget(data_key, ids) if ids else []
        return [json.loads(raw) for raw in raws if raw is not None]  # None: trimmed in between

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception as e:  # health checks must answer, whatever went wrong
            logger.warning("redis at %s did not answer ping: %s", self._where, e)
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def make_store(redis_url: str | None, **kw: Any) -> Store:
    """RedisStore for a URL (e.g. RAGREC_REDIS_URL), else the in-process MemoryStore.
    `kw` goes to `RedisStore.from_url` or `MemoryStore`."""
    if redis_url:
        return RedisStore.from_url(redis_url, **kw)
    return MemoryStore(**kw)
