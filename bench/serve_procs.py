"""The processes bench/serve_load.py measures: the service (``python -m app.cli serve``) and a
private redis-server, each on a free loopback port, each always stopped by ``stop()``.

``cpus``: the CPUs a process and everything it starts may run on (``os.sched_setaffinity`` in
the child before it runs the program, so uvicorn's workers and the rebuild subprocesses inherit
it); None leaves the scheduler free."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _pin(cpus: list[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)  # one system call: safe between fork and exec


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc), the session leader first."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return sorted(pids, key=lambda p: (p != sid, p))


def process_memory(pid: int) -> dict[str, object] | None:
    """Resident memory of one process in MiB: rss (what ps shows), its anonymous part (private
    heap: model, arrays read into memory), its file-backed part (libraries, mapped index files:
    shared with every process mapping the same file) and pss (proportional: each shared page
    divided among the processes mapping it, so the pss of all processes adds up to the RAM they
    use together). None if the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None

    def kib(text: str, key: str) -> float:
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    return {"pid": pid, "cmd": cmd[:120], "rss_mib": round(kib(status, "VmRSS"), 1),
            "anon_mib": round(kib(status, "RssAnon"), 1), "file_mib": round(kib(status, "RssFile"), 1),
            "pss_mib": round(kib(rollup, "Pss"), 1)}


def session_cpu_s(sid: int) -> float | None:
    """User + system CPU seconds of every live process in session ``sid`` plus the children they
    reaped (Linux /proc): the server and its rebuild subprocesses. None where unavailable."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[3]) == sid:
            found = True
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK") if found else None


class Server:
    """``python -m app.cli serve`` in its own process group; stop() always takes it down."""

    def __init__(self, run: Path, host: str, env_extra: dict[str, str], log_dir: Path, tag: str,
                 api_key: str, *, workers: int = 1, cpus: list[int] | None = None) -> None:
        self.run, self.host, self.env_extra, self.tag = run, host, env_extra, tag
        self.workers, self.cpus = workers, cpus
        self.admin_headers = {"X-API-Key": api_key}
        self.log_path = log_dir / f"server-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_offset = 0

    @property
    def base_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        """A client for the script's own calls (admin, probes), with the API key."""
        return httpx.Client(base_url=self.base_url, headers=self.admin_headers, timeout=timeout_s, trust_env=False)

    def start(self, timeout_s: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGREC_")} | self.env_extra
        for attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port(self.host)
            cmd = [sys.executable, "-m", "app.cli", "serve", "--run", str(self.run),
                   "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
            with open(self.log_path, "ab") as log:
                self._log_offset = log.tell()
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_pin(self.cpus))
            if self._wait_healthy(timeout_s):
                return
            self.stop()
            if attempt == 2:
                break
        raise RuntimeError(f"server did not become healthy; log {self.log_path}:\n{self.log_tail()}")

    def _wait_healthy(self, timeout_s: float) -> bool:
        """/healthz answers, and with --workers N every worker has finished its start-up (the
        first one answers while the others may still be loading, which would skew a phase)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0, trust_env=False) as c:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    up = c.get("/healthz").status_code == 200
                    if up and (self.workers == 1 or self._workers_started() >= self.workers):
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        return False

    def _workers_started(self) -> int:
        """uvicorn's "Application startup complete." lines in this start's part of the log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().count(b"Application startup complete.")
        except OSError:
            return 0

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def memory(self) -> list[dict[str, object]]:
        """``process_memory`` of every process of the server (uvicorn's supervisor and its workers
        with --workers > 1, the rebuild subprocess while one runs), the first one started first."""
        if self.proc is None:
            return []
        return [m for pid in session_pids(self.proc.pid) if (m := process_memory(pid)) is not None]

    def cpu_s(self) -> float | None:
        return session_cpu_s(self.proc.pid) if self.proc is not None else None  # start_new_session: sid = pid

    def batch_stats(self) -> tuple[float, float] | None:
        """(sum, count) of the ragrec_inference_batch_size histogram from /metrics."""
        try:
            with self.client(5.0) as c:
                text = c.get("/metrics").text
        except httpx.HTTPError:
            return None
        vals: dict[str, float] = {}
        for line in text.splitlines():
            for key in ("ragrec_inference_batch_size_sum", "ragrec_inference_batch_size_count"):
                if line.startswith(key + " ") or line.startswith(key + "{"):
                    vals[key] = vals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        if len(vals) != 2:
            return None
        return vals["ragrec_inference_batch_size_sum"], vals["ragrec_inference_batch_size_count"]

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)  # the server's own group (start_new_session): uvicorn and any workers
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class RedisServer:
    """A private redis-server on a free loopback port, no persistence; stop() then start() keeps the port."""

    def __init__(self, binary: str, host: str, work_dir: Path, cpus: list[int] | None = None) -> None:
        self.binary, self.host, self.work_dir, self.cpus = binary, host, work_dir, cpus
        self.port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{url_host(self.host)}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            preexec_fn=_pin(self.cpus))
        deadline = time.monotonic() + timeout_s
        while not self._answers_ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
