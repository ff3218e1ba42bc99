"""The ragrec command as a user runs it: a real subprocess, real files."""

import json
import subprocess
import sys

import pytest

from training.data.synthetic import generate_interactions, write_inter

pytestmark = pytest.mark.slow  # each case starts the ragrec command in a new process


def ragrec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def inter(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "syn.inter"
    write_inter(generate_interactions(60, 40, mean_length=10, seed=1), path)
    return path


TINY = ["--set", "model.dim=8", "--set", "model.inner=16", "--set", "train.epochs=1", "--set", "data.max_seq_len=8"]


def test_train_then_evaluate_agree(tmp_path, inter):
    out = tmp_path / "run"
    res = ragrec("train", "--out", str(out), "--set", f"data.path={inter}", *TINY)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    ev = ragrec("evaluate", "--run", str(out))
    assert ev.returncode == 0, ev.stderr
    again = json.loads(ev.stdout)
    assert again["test"]["NDCG@10"] == pytest.approx(printed["test"]["NDCG@10"], abs=1e-6)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--set", "data.path=/nonexistent/x.inter"], "/nonexistent/x.inter"),
        ("bad_cfg", [], "unknown key 'train.lrr'"),
        (None, ["--set", "train.epochs=ten"], "'train.epochs'"),
        ("missing_col", [], "timestamp"),
        ("malformed", [], "malformed.inter"),
        ("too_short", [], "no training examples"),
    ],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, inter, setup, args, message):
    out = tmp_path / "run"
    extra = ["--set", f"data.path={inter}"]
    if setup == "bad_cfg":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("train:\n  lrr: 1\n")
        extra += ["--config", str(cfg)]
    elif setup == "missing_col":
        p = tmp_path / "nocol.csv"
        p.write_text("user_id,item_id\n1,2\n1,3\n")
        extra = ["--set", f"data.path={p}"]
    elif setup == "malformed":
        p = tmp_path / "malformed.inter"
        p.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnot-a-time\n")
        extra = ["--set", f"data.path={p}"]
    elif setup == "too_short":
        p = tmp_path / "short.csv"
        p.write_text("user_id,item_id,timestamp\n1,2,1\n2,3,1\n")
        extra = ["--set", f"data.path={p}"]
    res = ragrec("train", "--out", str(out), *TINY, *extra, *args)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], res.stderr  # one error line, the last thing printed; no traceback
    assert "Traceback" not in res.stderr
    assert message in errors[0]
    assert not out.exists()


def test_evaluate_on_missing_run_is_clear(tmp_path):
    res = ragrec("evaluate", "--run", str(tmp_path / "nope"))
    assert res.returncode != 0
    assert "not a finished run" in res.stderr


def test_serve_refuses_a_taken_port_and_a_missing_run(tmp_path, inter):
    import socket

    out = tmp_path / "run"
    assert ragrec("train", "--out", str(out), "--set", f"data.path={inter}", *TINY).returncode == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = ragrec("serve", "--run", str(out), "--port", str(port))
    assert res.returncode == 2
    assert "already in use" in res.stderr
    res = ragrec("serve", "--run", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert "not a finished run" in res.stderr
    # workers share state through Redis: without it, one clear line before anything starts
    res = ragrec("serve", "--run", str(out), "--workers", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --workers 2 needs RAGREC_REDIS_URL")


def test_report_writes_pngs_and_refuses_a_missing_run(tmp_path, inter):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert ragrec("train", "--out", str(out), "--set", f"data.path={inter}", *TINY).returncode == 0
    res = ragrec("report", str(out))
    assert res.returncode == 0, res.stderr
    report = out / "report" / "report.md"
    assert res.stdout.strip() == str(report)
    assert list((out / "report").glob("*.png"))
    bad = ragrec("report", str(tmp_path / "nope"))
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:")


@pytest.mark.redis
def test_serve_with_two_workers_shares_state_through_redis(tmp_path, inter, redis_server):
    """`ragrec serve --workers 2`: a supervisor without the model (started afresh, not a copy of
    the command's process) and two workers, which answer from one shared Redis."""
    import os
    import signal
    import socket
    import time
    import uuid
    from pathlib import Path

    import httpx

    out = tmp_path / "run"
    assert ragrec("train", "--out", str(out), "--set", f"data.path={inter}", *TINY).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGREC_")}
    env |= {"RAGREC_REDIS_URL": redis_server.url, "RAGREC_REDIS_PREFIX": f"workers-{uuid.uuid4().hex}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--run", str(out), "--port", str(port),
                                 "--workers", "2"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        children: list[int] = []
        while len(children) < 2 or not _answers(url):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            children = [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            time.sleep(0.2)
        supervisor = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"uvicorn" in supervisor and b"--workers" in supervisor, supervisor
        assert "/torch/" not in Path(f"/proc/{proc.pid}/maps").read_text()  # torch stays in the workers
        user = f"u-{uuid.uuid4().hex[:8]}"
        r = httpx.post(f"{url}/v1/events", json={"user_id": user, "item_id": "1", "timestamp": 1.0})
        assert r.status_code == 200, r.text
        for _ in range(12):  # fresh connections: either worker may answer, each reads the one Redis
            h = httpx.get(f"{url}/v1/users/{user}/history")
            assert h.status_code == 200 and [e["item_id"] for e in h.json()["items"]] == ["1"], h.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
