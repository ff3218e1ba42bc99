"""bench/serve_loadgen.py: its statistics against numpy and hand-computed cases, and one short
load_worker run against a real HTTP server on loopback that ends through its stop file."""

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
