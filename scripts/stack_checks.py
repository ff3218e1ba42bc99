"""The checks of scripts/stack_smoke.sh, run against the local stack of docker-compose.host.yml.

Standard library only (it runs with the host's python3, outside the images). Every request goes to
127.0.0.1: the proxy on :18000, the replicas api and api2 on :18001 and :18002, Redis on :16379.
Each check prints one `PASS name: figures` or `FAIL name: why` line and appends it to --results
(JSON lines), which the shell script counts. Figures (totals, failures, gaps, times) are in the lines.

    python3 scripts/stack_checks.py --compose "docker-compose -p ragrec-smoke -f ... -f ..." \
        --api-key KEY --results /tmp/results.jsonl [--only NAME ...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shlex
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
PROXY, API, API2, REDIS_PORT = 18000, 18001, 18002, 16379
LOCK_KEY = "ragrec:lock:rebuild"  # app/store.py: <prefix>:lock:<name>, app/jobs.py: LOCK
ITEMS = [str(i) for i in range(1, 400)]  # ML-100K item ids (popular range); unknown ones are only reported


# ---------------------------------------------------------------------------------------------- HTTP

def call(port: int, method: str, path: str, body: Any = None, key: str | None = None,
         timeout: float = 30.0) -> tuple[int, Any]:
    """One request on a fresh connection: (status, parsed JSON or text). Status 0: no answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        resp = conn.getresponse()
        raw = resp.read().decode()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    except (OSError, http.client.HTTPException) as e:
        return 0, str(e)
    finally:
        conn.close()


def wait_for(pred: Callable[[], bool], timeout: float, every: float = 0.5) -> float | None:
    """Seconds until pred() is true, or None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if pred():
                return time.monotonic() - start
        except Exception:  # a probe that raises counts as "not yet"
            pass
        time.sleep(every)
    return None


def items_body(k: int = 10, **extra: Any) -> dict:
    return {"items": random.sample(ITEMS, 5), "k": k, **extra}


class Load:
    """Bounded closed-loop load through the proxy: `clients` threads, each sending its next
    item-carrying POST /v1/recommend when the last one answered, `think` seconds apart.
    Failures are answers other than 200 and requests that got no answer."""

    def __init__(self, clients: int = 4, think: float = 0.02, port: int = PROXY) -> None:
        self.clients, self.think, self.port = clients, think, port
        self.results: list[tuple[float, int, float]] = []  # (start, status, latency)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                conn.request("POST", "/v1/recommend", json.dumps(items_body()), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
            with self._lock:
                self.results.append((t0, status, time.monotonic() - t0))
            time.sleep(self.think)
        conn.close()

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def summary(self) -> dict[str, Any]:
        lat = sorted(r[2] for r in self.results) or [0.0]
        failed = sum(1 for r in self.results if r[1] != 200)
        return {"total": len(self.results), "failed": failed,
                "p50_ms": round(1000 * statistics.median(lat), 1),
                "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                "max_ms": round(1000 * lat[-1], 1),
                "statuses": sorted({r[1] for r in self.results})}


# ------------------------------------------------------------------------------------------ docker

class Stack:
    def __init__(self, compose: str, api_key: str) -> None:
        self.compose, self.key = shlex.split(compose), api_key

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip()[-400:]}")
        return res.stdout.strip()

    def compose_cmd(self, *args: str, timeout: float = 600) -> str:
        return self.run(*self.compose, *args, timeout=timeout)

    def container(self, service: str) -> str:
        cid = self.compose_cmd("ps", "-q", service)
        if not cid:
            raise RuntimeError(f"no container for service {service}")
        return cid.splitlines()[0]

    def inspect(self, service: str, fmt: str) -> str:
        return self.run("docker", "inspect", "-f", fmt, self.container(service))

    def crash(self, service: str) -> None:
        """SIGKILL the container's main process from the host: a crash, as an OOM kill would be.
        (`docker kill` would mark the container as stopped by hand, and docker 20.10 then does not
        apply its restart policy.)"""
        pid = self.run("docker", "inspect", "-f", "{{.State.Pid}}", self.container(service))
        self.run("kill", "-KILL", pid)

    @staticmethod
    def redis(*args: str) -> str:
        """One Redis command over loopback (RESP, no client library); a bulk or simple reply as text,
        "" for nil or when Redis does not answer."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection((HOST, REDIS_PORT), timeout=2) as sock:
                sock.sendall(payload.encode())
                answer = sock.makefile("rb")
                reply = answer.readline().decode().rstrip("\r\n")
                if reply.startswith("$"):
                    n = int(reply[1:])
                    return "" if n < 0 else answer.read(n + 2).decode()[:n]
                return reply[1:] if reply[:1] in "+:" else ""
        except OSError:
            return ""


def index_version(port: int) -> str | None:
    status, body = call(port, "GET", "/v1/index", timeout=5)
    return body.get("version") if status == 200 else None


def versions_served() -> tuple[str | None, str | None]:
    return index_version(API), index_version(API2)


# ---------------------------------------------------------------------------------------- checks

class Checks:
    def __init__(self, stack: Stack, results_path: str, rebuild_interval: float, lock_ttl: float) -> None:
        self.stack, self.results_path = stack, results_path
        self.interval, self.lock_ttl = rebuild_interval, lock_ttl
        self.posted: list[tuple[str, str]] = []  # (user, item) events answered 200

    def record(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        with open(self.results_path, "a") as f:
            f.write(json.dumps({"check": name, "ok": ok, "detail": detail}) + "\n")
        return ok

    def post_events(self, port: int, events: list[tuple[str, str]]) -> int:
        body = [{"user_id": u, "item_id": i} for u, i in events]
        status, _ = call(port, "POST", "/v1/events", body)
        if status == 200:
            self.posted.extend(events)
        return status

    # 1. through the proxy ------------------------------------------------------------------------
    def api(self) -> None:
        k = self.stack.key
        s, b = call(PROXY, "POST", "/v1/recommend", items_body(k=10))
        self.record("proxy: recommend by items", s == 200 and len(b.get("items", [])) == 10,
                    f"HTTP {s}, {len(b.get('items', [])) if s == 200 else b}")
        s, b = call(PROXY, "POST", "/v1/recommend", {"user_id": "196", "k": 10})
        self.record("proxy: recommend by user", s == 200 and len(b.get("items", [])) == 10 and b.get("fallback") is None,
                    f"HTTP {s}, fallback {b.get('fallback') if s == 200 else b}")
        user = f"smoke-{int(time.time())}"
        events = [(user, str(i)) for i in (50, 172, 181, 7, 98)]
        s = self.post_events(API, events)  # to one replica ...
        hs, hb = call(API2, "GET", f"/v1/users/{user}/history")  # ... read back from the other
        got = [e["item_id"] for e in hb.get("items", [])] if hs == 200 else []
        self.record("events on api, history from api2 (shared Redis)", s == 200 and got == [i for _, i in events],
                    f"POST HTTP {s}, GET HTTP {hs}, {len(got)}/{len(events)} events back")
        s, b = call(PROXY, "POST", "/v1/recommend", items_body(k=5, explain=True))
        nb = len((b.get("explanation") or {}).get("neighbours") or []) if s == 200 else 0
        self.record("proxy: explain with neighbours", s == 200 and b.get("retrieval_used") is True and nb > 0,
                    f"HTTP {s}, retrieval_used {b.get('retrieval_used') if s == 200 else '-'}, {nb} neighbours")
        s, b = call(PROXY, "POST", "/v1/evaluate", {"split": "test", "ks": [10], "bootstrap_resamples": 200}, key=k)
        result: dict = {}
        if s == 202:
            job = b["job_id"]
            done = wait_for(lambda: call(PROXY, "GET", f"/v1/evaluate/{job}", key=k)[1].get("status")
                            in ("succeeded", "failed"), timeout=300, every=2)
            _, rec = call(PROXY, "GET", f"/v1/evaluate/{job}", key=k)
            result = rec.get("result") or {}
            detail = (f"{rec.get('status')} in {done and round(done)} s: NDCG@10 with "
                      f"{result.get('with_retrieval', {}).get('NDCG@10')}, without "
                      f"{result.get('without_retrieval', {}).get('NDCG@10')}")
        else:
            detail = f"HTTP {s}: {b}"
        self.record("proxy: /v1/evaluate with and without retrieval",
                    bool(result.get("with_retrieval")) and bool(result.get("without_retrieval")), detail)
        s, b = call(PROXY, "GET", "/metrics")
        self.record("proxy: /metrics", s == 200 and "ragrec_http_requests_total" in str(b), f"HTTP {s}")
        admin = [("POST", "/v1/index/rebuild", None), ("POST", "/v1/evaluate", {"split": "test"}),
                 ("GET", "/v1/jobs/none", None), ("POST", "/v1/index/rollback", None)]
        codes = [call(PROXY, m, p, body)[0] for m, p, body in admin]
        self.record("proxy: admin endpoints 401 without the key", codes == [401] * len(admin), f"HTTP {codes}")

    # 2. rebuild under load --------------------------------------------------------------------------
    def _rebuild_on_demand(self, timeout: float = 240) -> str | None:
        """POST /v1/index/rebuild (retried while another holds the lock); the new version or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s, b = call(PROXY, "POST", "/v1/index/rebuild", key=self.stack.key)
            if s == 202:
                job = b["job_id"]
                wait_for(lambda job=job: call(PROXY, "GET", f"/v1/jobs/{job}", key=self.stack.key)[1].get("status")
                         in ("succeeded", "failed"), timeout=deadline - time.monotonic(), every=1)
                _, rec = call(PROXY, "GET", f"/v1/jobs/{job}", key=self.stack.key)
                if rec.get("status") != "succeeded":
                    print(f"  rebuild job {job}: {rec.get('status')} {rec.get('error')}", flush=True)
                    return None
                return (rec.get("result") or {}).get("version") or index_version(PROXY)
            time.sleep(2)  # 409: a rebuild (the worker's) holds the lock
        return None

    def rebuild_under_load(self) -> None:
        restarts = {s: self.stack.inspect(s, "{{.State.StartedAt}}") for s in ("api", "api2")}
        v0 = versions_served()
        swaps: list[str] = []
        with Load() as load:
            # the worker's scheduled rebuild: both replicas move off v0 to the same new version
            took = wait_for(lambda: (v := versions_served())[0] == v[1] and v[0] not in (None, *v0),
                            timeout=self.interval + 180, every=0.5)
            v1 = versions_served()[0]
            if took is not None:
                swaps.append(f"scheduled {v0[0]}->{v1} ({took:.0f} s)")
            # an on-demand rebuild through the proxy
            t0 = time.monotonic()
            built = self._rebuild_on_demand()
            took2 = wait_for(lambda: (v := versions_served())[0] == v[1] and v[0] not in (None, v1),
                             timeout=60, every=0.5)
            if built and took2 is not None:
                swaps.append(f"on-demand ->{versions_served()[0]} ({time.monotonic() - t0:.0f} s)")
            time.sleep(2)
        same = all(self.stack.inspect(s, "{{.State.StartedAt}}") == t for s, t in restarts.items())
        st = load.summary()
        self.record("rebuild under load: 2 swaps, both replicas, no restart, 0 failed",
                    len(swaps) >= 2 and same and st["failed"] == 0 and st["total"] > 0,
                    f"{'; '.join(swaps) or 'no swap'}; replicas restarted: {not same}; failed {st['failed']}/"
                    f"{st['total']}, p50 {st['p50_ms']} ms, p99 {st['p99_ms']} ms")

    # 3. kill a replica ----------------------------------------------------------------------------
    def kill_replica(self) -> None:
        before = int(self.stack.inspect("api2", "{{.RestartCount}}"))
        with Load() as load:
            time.sleep(3)
            t_kill = time.monotonic()
            self.stack.crash("api2")
            # answering again directly (restarted by its policy, model loaded)
            back = wait_for(lambda: call(API2, "GET", "/healthz", timeout=1)[0] == 200, timeout=180, every=0.2)
            # and taking the proxy's traffic again: its own request counter grows under the load
            def served() -> float:
                _, text = call(API2, "GET", "/metrics", timeout=2)
                return sum(float(v) for v in re.findall(
                    r'^ragrec_http_requests_total\{[^}]*route="/v1/recommend"[^}]*\} (\S+)', str(text), re.M))
            first = served() if back is not None else 0.0
            rejoined = back is not None and wait_for(lambda: served() > first + 5, timeout=30) is not None
            time.sleep(2)
        after = int(self.stack.inspect("api2", "{{.RestartCount}}"))
        st = load.summary()
        window = [r for r in load.results if r[0] >= t_kill]
        ok = st["total"] > 0 and st["failed"] <= 0.001 * st["total"] and after > before and rejoined
        self.record("kill a replica under load: <=0.1% failed, restarts by policy, rejoins", ok,
                    f"failed {st['failed']}/{st['total']} (statuses {st['statuses']}); replica gap "
                    f"{back and round(back, 1)} s (kill to /healthz 200), restart count {before}->{after}, "
                    f"rejoined {rejoined}; slowest request {st['max_ms']} ms, "
                    f"{len(window)} requests after the kill")

    # 4. kill Redis ------------------------------------------------------------------------------
    def kill_redis(self) -> None:
        users = [f"durable-{int(time.time())}-{u}" for u in range(40)]
        events = [(u, str(10 + 7 * j + i)) for i, u in enumerate(users) for j in range(5)]
        for start in range(0, len(events), 50):
            self.post_events(PROXY, events[start:start + 50])
        redis = self.stack.container("redis")
        self.stack.run("docker", "update", "--restart=no", redis)  # held down until we start it
        probes: dict[str, list[int]] = {"items": [], "history": [], "readyz": []}
        try:
            with Load() as load:
                time.sleep(2)
                self.stack.run("docker", "kill", redis)
                t_down = time.monotonic()
                time.sleep(1)
                while time.monotonic() - t_down < 8:
                    probes["items"].append(call(PROXY, "POST", "/v1/recommend", items_body(), timeout=10)[0])
                    probes["history"].append(call(PROXY, "GET", "/v1/users/196/history", timeout=10)[0])
                    s, b = call(API, "GET", "/readyz", timeout=5)
                    probes["readyz"].append(s if not isinstance(b, dict) or b.get("status") == "degraded" else -s)
                    time.sleep(0.5)
                t_up = time.monotonic()
                self.stack.run("docker", "start", redis)
                recovered = wait_for(lambda: all(call(p, "GET", "/readyz", timeout=2)[0] == 200 for p in (API, API2)),
                                     timeout=60, every=0.5)
                time.sleep(1)
        finally:
            self.stack.run("docker", "update", "--restart=unless-stopped", redis)
        st = load.summary()
        during = [r for r in load.results if t_down <= r[0] <= t_up]
        ok = (all(s == 200 for s in probes["items"]) and all(s == 503 for s in probes["history"])
              and all(s == 503 for s in probes["readyz"]) and recovered is not None
              and all(r[1] == 200 for r in during))
        self.record("kill Redis under load: items served, history 503, /readyz degraded then ready", ok,
                    f"probes while down: items {sorted(set(probes['items']))} x{len(probes['items'])}, "
                    f"history {sorted(set(probes['history']))}, readyz {sorted(set(probes['readyz']))}; "
                    f"load while down {sum(r[1] == 200 for r in during)}/{len(during)} answered 200 "
                    f"(all load: failed {st['failed']}/{st['total']}); ready again {recovered and round(recovered, 1)} s "
                    f"after Redis started")

    # 6 + 4. down/up: cold start and durability -------------------------------------------------
    def down_up(self, services: list[str]) -> None:
        self.stack.compose_cmd("down", "--remove-orphans", timeout=300)
        up = threading.Thread(target=self.stack.compose_cmd, args=("up", "-d", *services), daemon=True)
        up.start()
        cold = wait_for(lambda: call(PROXY, "POST", "/v1/recommend", items_body(), timeout=5)[0] == 200,
                        timeout=300, every=0.25)
        up.join(300)
        self.record("cold start: up to the first answered recommend (trained volume)", cold is not None,
                    f"{cold and round(cold, 1)} s")
        wait_for(lambda: all(call(p, "GET", "/readyz", timeout=2)[0] == 200 for p in (API, API2)), timeout=120)
        by_user: dict[str, list[str]] = {}
        for user, item in self.posted:
            by_user.setdefault(user, []).append(item)
        lost = 0
        for user, items in by_user.items():
            s, b = call(PROXY, "GET", f"/v1/users/{user}/history")
            have = [e["item_id"] for e in b.get("items", [])] if s == 200 else []
            lost += sum(1 for i in items if i not in have)
        self.record("events survive down/up (Redis AOF on a volume)", lost == 0 and self.posted != [],
                    f"{lost} lost of {len(self.posted)} posted ({len(by_user)} users)")

    # 5. kill the worker mid-rebuild ------------------------------------------------------------------
    def kill_worker(self) -> None:
        before = set(filter(None, versions_served()))
        owner, held = None, False
        for _ in range(3):  # the worker's next scheduled rebuild; killed ~4 s in (child spawned, encoding)
            if wait_for(lambda: bool(self.stack.redis("GET", LOCK_KEY)), timeout=self.interval + 120, every=0.2) is None:
                break
            owner = self.stack.redis("GET", LOCK_KEY)
            time.sleep(4.0)
            if self.stack.redis("GET", LOCK_KEY) == owner:  # still building: kill it now
                self.stack.crash("worker")
                held = self.stack.redis("GET", LOCK_KEY) == owner
                break
            wait_for(lambda: not self.stack.redis("GET", LOCK_KEY), timeout=60)  # it finished first: next one
        if not held:
            self.record("kill the worker mid-rebuild", False, "never caught the worker holding the rebuild lock")
            return
        served: set[str] = set()

        def expired() -> bool:
            served.update(filter(None, versions_served()))
            return self.stack.redis("GET", LOCK_KEY) != owner

        gone = wait_for(expired, timeout=self.lock_ttl + 60, every=0.5)
        partial = served - before
        # every version directory on disk the replicas would list has a manifest (complete)
        listing = self.stack.run("docker", "exec", self.stack.container("api"), "sh", "-c",
                                 "cd /artifacts/run/index && for d in v*; do [ -f $d/manifest.json ] || echo $d; done; "
                                 "cat current 2>/dev/null || readlink current", check=False)
        after = self._rebuild_on_demand()
        both = wait_for(lambda: (v := versions_served())[0] == v[1] and v[0] not in before, timeout=60)
        ok = held and gone is not None and not partial and after is not None and both is not None
        self.record("kill the worker mid-rebuild: nothing partial served, lock expires, next rebuild succeeds", ok,
                    f"lock held by the dead worker at kill: {held}; expired {gone and round(gone, 1)} s after the kill "
                    f"(ttl {self.lock_ttl:.0f} s); versions served meanwhile {sorted(served)} (before: {sorted(before)}); "
                    f"disk: {listing.replace(chr(10), ' | ') or '-'}; next rebuild -> {after}, on both replicas: "
                    f"{both is not None}; worker restarts: {self.stack.inspect('worker', '{{.RestartCount}}')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compose", required=True, help="the compose command line, project and files included")
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--rebuild-interval", type=float, default=30.0)
    ap.add_argument("--lock-ttl", type=float, default=20.0)
    ap.add_argument("--services", default="redis api api2 worker proxy-host")
    ap.add_argument("--only", nargs="*", default=None,
                    help="api rebuild_under_load kill_replica kill_redis down_up kill_worker")
    args = ap.parse_args()
    checks = Checks(Stack(args.compose, args.api_key), args.results, args.rebuild_interval, args.lock_ttl)
    # both replicas serve an index (one built it at start-up, the other picked it up) before checking
    ready = wait_for(lambda: all(call(p, "GET", "/readyz", timeout=2)[0] == 200 for p in (API, API2)), timeout=180)
    checks.record("both replicas ready (model, store, index)", ready is not None,
                  f"{ready and round(ready, 1)} s after up; " + "; ".join(
                      f":{p} {call(p, 'GET', '/readyz', timeout=2)[1]}" for p in (API, API2)))
    order = ["api", "rebuild_under_load", "kill_replica", "kill_redis", "down_up", "kill_worker"]
    for name in order:
        if args.only is not None and name not in args.only:
            continue
        fn = getattr(checks, name)
        try:
            fn(args.services.split()) if name == "down_up" else fn()
        except Exception as e:  # one broken check must not hide the others' figures
            checks.record(name, False, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
