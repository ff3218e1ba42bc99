"""bench/serve_loadgen.py: its statistics against numpy and hand-computed cases, the open loop's
Poisson schedule, one short load_worker run against a real HTTP server on loopback that ends
through its stop file, and one short open-loop run against it (no timing asserts); and
bench/serve_load.py's CPU pinning plan and per-request CPU arithmetic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.support import bench_module


@pytest.fixture(scope="module")
def loadgen() -> ModuleType:
    return bench_module("serve_loadgen")


def test_percentile_matches_numpy(loadgen: ModuleType) -> None:
    xs = sorted(np.random.default_rng(0).exponential(size=101).tolist())
    for q in (0, 1, 50, 90, 99, 100):
        assert loadgen.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert np.isnan(loadgen.percentile([], 50))


def test_windows_and_summary(loadgen: ModuleType) -> None:
    # (start, latency, status, kind); one window [10, 20]
    before, across_start, inside, across_end, after = (
        (5.0, 1.0, 200, "items"), (9.5, 1.0, 200, "items"), (12.0, 2.0, 503, "history"),
        (19.0, 2.0, 200, "items"), (21.0, 1.0, 200, "items"))
    window = [(10.0, 20.0)]
    assert [loadgen.overlaps(r, window) for r in (before, across_start, inside, across_end, after)] == [
        False, True, True, True, False]
    assert [loadgen.within(r, 10.0, 20.0) for r in (across_start, inside, across_end)] == [False, True, False]
    s = loadgen.latency_summary([before, inside, after])
    assert s["requests"] == 3 and s["errors"] == 1 and s["statuses"] == {"200": 2, "503": 1}
    assert s["p50_ms"] == pytest.approx(1000.0) and s["max_ms"] == pytest.approx(1000.0)


class _Healthz(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self) -> None:  # echoes the body's length, so a misframed request shows as a bad answer
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = body.startswith(b"{") and body.endswith(b"}")
        answer = str(len(body)).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_load_worker_records_requests_and_stops_on_file(loadgen: ModuleType, http_server: str,
                                                         tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    threading.Timer(0.3, stop.touch).start()
    spec = loadgen.LoadSpec(http_server, "healthz", [], concurrency=2, seconds=30.0, max_requests=100_000,
                            timeout_s=5.0, k=10, seed=0, stop_file=str(stop))
    t0 = loadgen.now()
    out = loadgen.load_worker(spec)
    assert out["elapsed_s"] < 5.0  # the stop file ended it, not the 30 s deadline
    records = out["records"]
    assert records and all(r[2] == 200 and r[3] == "healthz" for r in records)
    assert all(t0 <= r[0] <= loadgen.now() and r[1] > 0 for r in records)


# ------------------------------------------------------------------------------------ open loop


def test_poisson_schedule_has_the_rate_and_exponential_gaps(loadgen: ModuleType) -> None:
    rate, seconds = 1000.0, 20.0
    t = loadgen.poisson_schedule(rate, seconds, seed=3)
    assert (np.diff(t) > 0).all() and t[0] >= 0 and t[-1] < seconds
    n = rate * seconds
    assert abs(len(t) - n) < 5 * n**0.5  # Poisson count: sd sqrt(n)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: coefficient of variation 1
    assert np.mean(gaps > 3 / rate) == pytest.approx(np.exp(-3), abs=0.01)  # its tail, P(gap > 3/rate)
    np.testing.assert_array_equal(t, loadgen.poisson_schedule(rate, seconds, seed=3))  # seeded
    assert not np.array_equal(loadgen.poisson_schedule(rate, seconds, seed=4)[:100], t[:100])
    with pytest.raises(ValueError, match="rate"):
        loadgen.poisson_schedule(0, 1.0, seed=0)


def test_open_loop_summary_counts_from_the_scheduled_time(loadgen: ModuleType) -> None:
    rng = np.random.default_rng(1)
    lat = rng.exponential(0.005, size=2000)
    # (scheduled, latency from it, status, dispatch lag, wait for a connection)
    records = [(i * 0.001, float(x), 200, 0.0001, 0.002) for i, x in enumerate(lat)]
    records += [(2.0, 0.5, "TimeoutError", 0.0, 0.0), (2.001, 0.01, 503, 0.0, 0.0)]
    s = loadgen.open_loop_summary(records, seconds=2.0)
    ms = lat * 1000
    for key, q in (("p50_ms", 50), ("p99_ms", 99), ("p999_ms", 99.9)):
        assert s[key] == pytest.approx(np.percentile(ms, q), abs=0.006), key
    assert s["ok"] == 2000 and s["errors"] == 2 and s["requests"] == 2002
    assert s["error_kinds"] == {"503": 1, "TimeoutError": 1}
    assert s["rps"] == pytest.approx(1000.0) and s["offered_rps"] == pytest.approx(1001.0)
    assert s["dispatch_lag_p99_ms"] == pytest.approx(0.1) and s["queue_wait_p99_ms"] == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["healthz", "recommend"])
def test_open_loop_worker_sends_its_schedule(loadgen: ModuleType, http_server: str, kind: str) -> None:
    items = [str(i) for i in range(100)]
    spec = loadgen.OpenLoopSpec(http_server, kind, items, rate=200.0, seconds=0.5, timeout_s=5.0, k=10, seed=2,
                                connections=4)
    out = loadgen.open_loop_worker(spec)
    records = out["records"]
    assert len(records) == len(loadgen.poisson_schedule(200.0, 0.5, seed=2)) > 0
    assert all(r[2] == 200 for r in records), loadgen.status_counts([(0, 0, r[2], "") for r in records])
    assert all(r[1] >= r[3] + r[4] >= 0 for r in records)  # latency from the schedule covers lag and wait
    assert out["cpu_s"] >= 0 and out["seconds"] == 0.5


@pytest.fixture(scope="module")
def serve_load(loadgen: ModuleType) -> ModuleType:
    # serve_load imports its siblings by name, as when run as a script: they are registered first
    bench_module("serve_procs")
    return bench_module("serve_load")


def test_pin_plan_splits_the_cpus_or_says_why_not(serve_load: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_load.os, "sched_getaffinity", lambda pid: {0, 1})
    plan = serve_load.pin_plan(True, 1)
    assert plan["applied"] and plan["server_cpus"] == [0] and plan["loadgen_cpus"] == [1]
    monkeypatch.setattr(serve_load.os, "sched_getaffinity", lambda pid: {3, 5, 6, 7})
    plan = serve_load.pin_plan(True, 2)
    assert plan["server_cpus"] == [3, 5] and plan["loadgen_cpus"] == [6, 7]
    monkeypatch.setattr(serve_load.os, "sched_getaffinity", lambda pid: {2})
    plan = serve_load.pin_plan(True, 1)
    assert not plan["applied"] and "needs 2 usable CPUs" in plan["reason"] and "unpinned" in plan["reason"]
    assert serve_load.pin_plan(False, 1) == {"requested": False, "applied": False, "usable_cpus": [2]}


def test_cpu_ms_per_request(serve_load: ModuleType) -> None:
    assert serve_load.cpu_ms_per_request(10.0, 12.5, 1000) == pytest.approx(2.5)
    assert serve_load.cpu_ms_per_request(None, 12.5, 1000) is None
    assert serve_load.cpu_ms_per_request(1.0, 2.0, 0) is None


class _Slow(_Healthz):
    def do_GET(self) -> None:
        threading.Event().wait(0.3)
        super().do_GET()


def test_open_loop_gives_up_on_a_saturated_server(loadgen: ModuleType) -> None:
    """One connection to a server answering every 0.3 s, 100 requests/s offered: the run ends
    timeout_s + 1 s after its schedule, and every scheduled request is counted, the ones never
    answered as errors."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = loadgen.OpenLoopSpec(f"http://127.0.0.1:{server.server_address[1]}", "healthz", [], rate=100.0,
                                    seconds=0.3, timeout_s=0.5, k=10, seed=5, connections=1)
        records = loadgen.open_loop_worker(spec)["records"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    statuses = loadgen.status_counts([(0, 0, r[2], "") for r in records])
    assert len(records) == len(loadgen.poisson_schedule(100.0, 0.3, seed=5))
    assert statuses.get("NotSent", 0) > 0 and statuses.get("200", 0) < len(records), statuses
