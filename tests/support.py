"""What the tests share with each other and with bench/: live servers, private redis-servers
and small constants. Test modules import helpers from here, never from each other.

The redis-server and ``ragrec serve`` process helpers are bench/serve_procs.py's (one
implementation, loaded from its file: bench/ is scripts, not a package); ``LiveServer`` runs
an app in this process so that tests can reach into it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

BENCH = Path(__file__).resolve().parents[1] / "bench"
RA_MAX_LEN = 10  # max_seq_len of the service tests' base run (tests/integration/conftest.py)


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py as a module (registered under its file name, as bench/ scripts import it)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_procs = bench_module("serve_procs")
RedisServer = _procs.RedisServer  # RedisServer(binary, host, work_dir): start(), stop(), url; keeps its port
Server = _procs.Server  # `python -m app.cli serve` in its own process group
free_port = _procs.free_port


def redis_binary() -> str:
    """The redis-server binary; a skip without one, a failure under CI (which installs it)."""
    binary = shutil.which("redis-server")
    if binary is None and os.environ.get("CI") == "true":
        pytest.fail("CI=true but redis-server is not installed: scripts/test.sh installs it with apt-get")
    if binary is None:
        pytest.skip("redis-server binary not found (CI installs it with apt-get install redis-server)")
    return binary


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port("127.0.0.1")
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ws="none", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see the log above)")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _no_server_errors(response: httpx.Response) -> None:
    # 503 is the store-down answer; any other 5xx is a bug at the edge
    assert response.status_code < 500 or response.status_code == 503, response.read()


def client_for(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10, event_hooks={"response": [_no_server_errors]})


class FakeClock:
    """A monotonic clock that moves only when told: ``MemoryStore(clock=FakeClock())``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    """Poll ``condition()`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())
