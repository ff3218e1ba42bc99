"""The service with a retrieval-augmented run: a tiny DuoRec + RA stage on generated data, served by
a real uvicorn on loopback. Expected answers are recomputed independently: brute-force cosine
search over the prefixes encoded with the saved RA model, fused by that model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.main import create_app
from app.store import RedisStore
from retriever import ArtifactStore
from tests.support import RA_MAX_LEN as MAX_LEN
from tests.support import LiveServer, client_for
from training.config import load_config
from training.data.readers import read_interactions
from training.data.sequences import Vocabulary, pad_prefixes
from training.ra.bundle import load_bundle

pytestmark = pytest.mark.slow  # retrieval runs trained and served by uvicorn

ADMIN = {"X-API-Key": "admin-key"}


def settings_for(run_dir: Path, index_dir: Path, **kw: Any):
    from app.settings import Settings

    return Settings(run_dir=run_dir, index_dir=index_dir, api_key="admin-key", index_poll_s=0.1, **kw)


@pytest.fixture
def served(ra_run: Path, tmp_path: Path) -> Iterator[tuple[httpx.Client, Any]]:
    app = create_app(settings_for(ra_run, tmp_path / "index"))
    with LiveServer(app) as server, client_for(server) as client:
        yield client, app


class Truth:
    """Brute-force neighbours and the neighbour vote, written out in numpy from the saved files
    (model.pt, retrieval.pt's key centre and vote settings) and the data file."""

    def __init__(self, run: Path) -> None:
        self.bundle = load_bundle(run)
        self.encoder = self.bundle.encoder
        self.vote = self.bundle.vote
        self.k = self.vote.k
        self.vocab = Vocabulary.load(run / "items.json")
        cfg = load_config(run / "config.yaml")
        inter = read_interactions(cfg.data.path)
        self.histories: dict[str, list[int]] = {}
        for user, item in zip(inter.users, inter.items, strict=True):  # file order is time order here
            self.histories.setdefault(str(user), []).append(self.vocab.lookup(str(item)))
        names = sorted(self.histories)
        seqs = [np.asarray(self.histories[n]) for n in names]
        self.entry_user = np.array([n for n, s in zip(names, seqs, strict=True) for _ in range(1, len(s))])
        self.entry_pos = np.concatenate([np.arange(1, len(s)) for s in seqs])
        self.entry_target = np.concatenate([s[1:] for s in seqs])
        rows = np.repeat(np.arange(len(seqs)), [len(s) - 1 for s in seqs])
        prefixes = torch.from_numpy(pad_prefixes(seqs, rows, self.entry_pos, MAX_LEN)[0])
        with torch.no_grad():
            h = self.encoder(prefixes) - self.bundle.center
        self.keys = (h / h.norm(dim=1, keepdim=True)).numpy()

    @torch.no_grad()
    def top(self, ids: list[int], k: int, *, user: str | None, retrieval: bool = True,
            exclude_seen: bool = True, target: int | None = None) -> list[str]:
        """The top k; with exclude_seen the sequence's items are dropped, except ``target`` (the
        evaluation protocol never hides the held-out item, which generated data may repeat)."""
        seq = torch.tensor([ids[-MAX_LEN:]])
        h = self.encoder(seq)
        scores = self.encoder.scores(h)[0].double()
        if retrieval:
            v = self.vote
            q = (h[0] - self.bundle.center).numpy()
            sim = self.keys @ (q / np.linalg.norm(q))
            sim[self.entry_user == user] = -np.inf  # the run's rule: a user's own entries are excluded
            best = np.argsort(-sim, kind="stable")[: self.k]
            p_knn = np.zeros(len(self.vocab) - 1)
            for b in best:
                w = np.exp((sim[b] - sim[best[0]]) / v.tau)
                nxt = self.histories[self.entry_user[b]][self.entry_pos[b]: self.entry_pos[b] + v.m]
                for j, item in enumerate(nxt):
                    if item not in ids:
                        p_knn[item - 1] += w * v.decay ** j
            if p_knn.sum() > 0:
                p_knn /= p_knn.sum()
                scores = (1 - v.lam) * torch.softmax(scores / v.T, dim=0) + v.lam * torch.from_numpy(p_knn)
        if exclude_seen:
            keep = scores[target - 1].item() if target is not None else None
            scores[torch.tensor(ids) - 1] = -torch.inf
            if target is not None:
                scores[target - 1] = keep
        return self.vocab.decode(torch.topk(scores, k).indices.numpy() + 1)


@pytest.fixture(scope="module")
def truth(ra_run: Path) -> Truth:
    return Truth(ra_run)


def recommend(client: httpx.Client, **body: Any) -> dict:
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(body: dict) -> list[str]:
    return [x["item_id"] for x in body["items"]]


def wait_job(client: httpx.Client, url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(url, headers=ADMIN).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ serving


def test_first_start_builds_and_serves_an_index(served: tuple[httpx.Client, Any], truth: Truth) -> None:
    client, _ = served
    info = client.get("/v1/index").json()
    assert info["retrieval"] is True and info["version"] == "v000001" and info["versions"] == ["v000001"]
    assert info["size"] == len(truth.entry_target) and info["type"] == "flat" and info["device"] == "cpu"
    assert info["model_version"].startswith("ra@")
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"model": True, "store": True, "index": True}, "detail": None}


def test_recommendations_with_and_without_retrieval_match_brute_force(served: tuple[httpx.Client, Any],
                                                                       truth: Truth) -> None:
    client, _ = served
    users = sorted(truth.histories)[:6]
    for user in users:
        ids = truth.histories[user]
        with_r = recommend(client, user_id=user, k=5)
        assert with_r["retrieval_used"] is True and with_r["index_version"] == "v000001"
        assert ids_of(with_r) == truth.top(ids, 5, user=user)
        without = recommend(client, user_id=user, k=5, use_retrieval=False)
        assert without["retrieval_used"] is False
        assert ids_of(without) == truth.top(ids, 5, user=user, retrieval=False)
    items = truth.vocab.decode(truth.histories[users[0]][:4])
    assert ids_of(recommend(client, items=items, k=5)) == truth.top(truth.histories[users[0]][:4], 5, user=None)


def test_explanation_lists_other_users_neighbours(served: tuple[httpx.Client, Any], truth: Truth) -> None:
    client, _ = served
    user = sorted(truth.histories)[3]
    body = recommend(client, user_id=user, k=3, explain=True)
    nb = body["explanation"]["neighbours"]
    assert len(nb) == truth.k and user not in {n["user_id"] for n in nb}
    assert sum(n["weight"] for n in nb) == pytest.approx(1.0, abs=1e-5)
    sims = [n["similarity"] for n in nb]
    assert sims == sorted(sims, reverse=True)
    returned = {x["item_id"]: x["score"] for x in body["items"]}
    added: dict[str, float] = {}
    for n in nb:  # each neighbour is a real entry: that user's items from that position on
        seq = truth.histories[n["user_id"]]
        assert truth.vocab.decode([seq[n["position"]]])[0] == n["target_item"]
        assert n["next_items"] == truth.vocab.decode(seq[n["position"]: n["position"] + truth.vote.m])
        assert set(n["contributions"]) <= returned.keys() & set(n["next_items"])
        for item, c in n["contributions"].items():
            added[item] = added.get(item, 0.0) + c
    fusion = body["explanation"]["fusion"]
    assert fusion["kind"] == "vote" and fusion["alpha_mean"] == pytest.approx(truth.vote.lam)
    # the vote's share of each returned item's score is exactly what its neighbours added
    ids = truth.histories[user]
    with torch.no_grad():
        base = torch.softmax(truth.encoder.scores(truth.encoder(torch.tensor([ids[-MAX_LEN:]])))[0] / truth.vote.T, 0)
    for item, score in returned.items():
        own = (1 - truth.vote.lam) * float(base[truth.vocab.lookup(item) - 1])
        assert score == pytest.approx(own + added.get(item, 0.0), rel=1e-4, abs=1e-7), item
    assert recommend(client, user_id=user, k=3, explain=True, use_retrieval=False)["explanation"]["neighbours"] == []


def test_events_become_retrievable_entries_at_once(served: tuple[httpx.Client, Any], truth: Truth) -> None:
    client, _ = served
    size = client.get("/v1/index").json()["size"]
    items = truth.vocab.decode(truth.histories[sorted(truth.histories)[0]][:5])
    user = f"fresh-{uuid.uuid4().hex[:6]}"
    events = [{"user_id": user, "item_id": it, "timestamp": 100 + i} for i, it in enumerate(items)]
    assert client.post("/v1/events", json=events).json() == {"accepted": 5, "duplicates": 0}
    assert client.post("/v1/events", json=events[-1]).json() == {"accepted": 0, "duplicates": 1}
    info = client.get("/v1/index").json()
    assert info["size"] == size + 4 and info["live_added"] >= 4  # the first event has no prefix
    # the same four-item prefix from someone else finds the new user's entry as its best match
    body = recommend(client, items=items[:4], k=3, explain=True)
    best = body["explanation"]["neighbours"][0]
    assert (best["user_id"], best["target_item"], best["position"]) == (user, items[4], 4)
    assert best["similarity"] == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------ index admin


def test_rebuild_rollback_and_refused_versions(served: tuple[httpx.Client, Any], tmp_path: Path) -> None:
    client, app = served
    assert client.post("/v1/index/rebuild").status_code == 401
    assert client.post("/v1/index/rollback", headers=ADMIN).status_code == 409  # only one version

    user = f"rebuilt-{uuid.uuid4().hex[:6]}"
    toks = app.state.engine.vocab.tokens
    client.post("/v1/events", json=[{"user_id": user, "item_id": toks[i], "timestamp": i} for i in range(3)])
    accepted = client.post("/v1/index/rebuild", headers=ADMIN)
    assert accepted.status_code == 202
    job = wait_job(client, accepted.json()["url"])
    assert job["status"] == "succeeded" and job["result"]["version"] == "v000002", job
    info = client.get("/v1/index").json()
    assert info["version"] == "v000002" and info["versions"] == ["v000001", "v000002"]
    assert info["size"] == client.get("/v1/index").json()["size"]
    assert asyncio.run(app.state.store.get_index_version()) == "v000002"
    served_users = set(app.state.jobs.manager.serving.user_names)
    assert user in served_users  # the rebuild read the stored events

    rolled = client.post("/v1/index/rollback", headers=ADMIN)
    assert rolled.status_code == 200 and rolled.json()["version"] == "v000001"
    assert ArtifactStore(tmp_path / "index").current() == "v000001"

    # a corrupted version is refused with the reason; the old one keeps serving
    index_file = tmp_path / "index" / "v000002" / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-7] + b"garbage")
    refused = client.post("/v1/index/load", json={"version": "v000002"}, headers=ADMIN)
    assert refused.status_code == 409 and "sha256" in refused.json()["detail"]
    assert client.get("/v1/index").json()["version"] == "v000001"
    assert recommend(client, items=toks[:3])["index_version"] == "v000001"
    # the same refusal when the shared store names it (another replica published it)
    asyncio.run(app.state.store.set_index_version("v000002"))
    deadline = time.monotonic() + 10
    while (info := client.get("/v1/index").json())["watch_error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "v000002" in info["watch_error"] and info["version"] == "v000001"
    assert client.post("/v1/index/load", json={"version": "v12"}, headers=ADMIN).status_code == 422
    assert client.post("/v1/index/load", json={"version": "v000009"}, headers=ADMIN).status_code == 409
    metrics = app.state.metrics.registry
    assert metrics.get_sample_value("ragrec_index_load_failures_total") >= 2


def test_a_bank_from_another_model_is_refused(served: tuple[httpx.Client, Any], tmp_path: Path) -> None:
    client, app = served
    manager = app.state.jobs.manager
    bank = manager.serving.bank
    other = ArtifactStore(tmp_path / "index").save(bank, producer_checksum="another-model", make_current=False,
                                                   attachments={"user_names": np.asarray(["x"] * 1)})
    r = client.post("/v1/index/load", json={"version": other}, headers=ADMIN)
    assert r.status_code == 409 and "another-model" in r.json()["detail"]
    assert client.get("/v1/index").json()["version"] == "v000001"


def test_only_one_rebuild_at_a_time(served: tuple[httpx.Client, Any]) -> None:
    client, app = served
    assert asyncio.run(app.state.store.acquire_lock("rebuild", "someone-else", 30))
    r = client.post("/v1/index/rebuild", headers=ADMIN)
    assert r.status_code == 409 and "another index rebuild is running" in r.json()["detail"]


# ------------------------------------------------------------------------------------ evaluation


def test_split_evaluation_matches_the_training_run(served: tuple[httpx.Client, Any], ra_run: Path) -> None:
    client, _ = served
    assert client.post("/v1/evaluate", json={"split": "test"}).status_code == 401
    r = client.post("/v1/evaluate", json={"split": "test", "bootstrap_resamples": 500}, headers=ADMIN)
    assert r.status_code == 202
    job = wait_job(client, r.json()["url"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["source"]["leakage_check"] == "passed" and "validation" in result["source"]["bank"]
    trained = json.loads((ra_run / "metrics.json").read_text())["test"]  # seen items masked, as served
    for side, name in (("with_retrieval", "with"), ("without_retrieval", "without")):
        for metric in ("NDCG@10", "HR@10"):
            assert result[side][metric] == pytest.approx(trained[name][metric], abs=1e-6), (side, metric)
    boot = result["ndcg10_delta_bootstrap"]
    assert boot["low"] <= boot["mean"] <= boot["high"]
    assert boot["mean"] == pytest.approx(result["delta"]["NDCG@10"], abs=1e-9)


def test_sequence_evaluation_and_bad_requests(served: tuple[httpx.Client, Any], truth: Truth) -> None:
    client, _ = served
    seqs = []
    for user in sorted(truth.histories)[:20]:
        items = truth.vocab.decode(truth.histories[user])
        seqs.append({"items": items[:-1], "target": items[-1], "user_id": user})
    seqs.append({"items": ["no-such-item"], "target": "nor-this"})
    r = client.post("/v1/evaluate", json={"sequences": seqs, "ks": [10]}, headers=ADMIN)
    job = wait_job(client, r.json()["url"])
    assert job["status"] == "succeeded", job
    assert job["result"]["examples"] == 20 and job["result"]["source"]["skipped"] == 1
    hits = sum(s["target"] in truth.top(truth.vocab.ids(s["items"]).tolist(), 10, user=s["user_id"],
                                        target=truth.vocab.lookup(s["target"])) for s in seqs[:20])  # the evaluation protocol: seen items masked
    assert job["result"]["with_retrieval"]["HR@10"] == pytest.approx(hits / 20)
    for bad in ({"split": "train"}, {"sequences": []}, {"sequences": [{"items": [], "target": "1"}]},
                {"ks": [0]}, {"split": "test", "bootstrap_resamples": 5}, {"split": "test", "extra": 1}):
        r = client.post("/v1/evaluate", json=bad, headers=ADMIN)
        assert r.status_code == 422, (bad, r.text)
    assert client.get("/v1/evaluate/nope", headers=ADMIN).status_code == 404


# ------------------------------------------------------------------------------------ replicas


@pytest.mark.redis
def test_replicas_share_the_lock_and_follow_new_versions(ra_run: Path, tmp_path: Path, redis_server: Any) -> None:
    kw = {"redis_url": redis_server.url, "redis_prefix": f"replicas-{uuid.uuid4().hex}"}
    a = create_app(settings_for(ra_run, tmp_path / "index", **kw))
    b = create_app(settings_for(ra_run, tmp_path / "index", **kw))
    with LiveServer(a) as sa, LiveServer(b) as sb, client_for(sa) as ca, client_for(sb) as cb:
        assert ca.get("/v1/index").json()["version"] == cb.get("/v1/index").json()["version"] == "v000001"
        job = wait_job(ca, ca.post("/v1/index/rebuild", headers=ADMIN).json()["url"])
        assert job["status"] == "succeeded"
        assert cb.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()["status"] == "succeeded"  # shared records
        deadline = time.monotonic() + 10
        while cb.get("/v1/index").json()["version"] != "v000002":  # b swaps without a restart
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # both serve v000002 from its one set of files, mapped read-only (what --workers N relies on)
        banks = [app.state.engine.index.serving.bank for app in (a, b)]
        for bank in banks:
            assert bank.version == "v000002" and bank.index.mapped
            with bank.read_locked() as cols:
                assert _mapped_file(cols["vectors"]) == str(tmp_path / "index" / "v000002" / "vectors.npy")
        # a live add copies b's bank only: a keeps its mapping, and the files stay as published
        user = f"replica-user-{uuid.uuid4().hex[:6]}"
        tokens = a.state.engine.vocab.tokens[1:4]
        r = cb.post("/v1/events", json=[{"user_id": user, "item_id": t, "timestamp": i} for i, t in enumerate(tokens)])
        assert r.status_code == 200, r.text
        assert not banks[1].index.mapped and len(banks[1]) > len(banks[0]) and banks[0].index.mapped
        ArtifactStore(tmp_path / "index").verify("v000002")
        # the lock was released after the job, and it is shared: while someone holds it, no replica starts one
        assert asyncio.run(_take_lock(redis_server.url, kw["redis_prefix"]))
        assert cb.post("/v1/index/rebuild", headers=ADMIN).status_code == 409
        assert ca.post("/v1/index/rebuild", headers=ADMIN).status_code == 409


def _mapped_file(arr: np.ndarray | None) -> str | None:
    """The file an array is a view of (through its base chain), None for memory of its own."""
    while arr is not None:
        if isinstance(arr, np.memmap):
            return str(arr.filename)
        arr = arr.base
    return None


async def _take_lock(url: str, prefix: str) -> bool:
    store = RedisStore.from_url(url, prefix=prefix)  # a client of the test's own event loop
    try:
        return await store.acquire_lock("rebuild", "the-test", 30)
    finally:
        await store.close()


def test_scheduled_rebuilds_publish_new_versions(ra_run: Path, tmp_path: Path) -> None:
    # in-process rebuilds here (worker threads); the other tests use the default child process
    app = create_app(settings_for(ra_run, tmp_path / "index", rebuild_interval=0.3, rebuild_subprocess=False))
    with LiveServer(app) as server, client_for(server) as client:
        deadline = time.monotonic() + 30
        while client.get("/v1/index").json()["version"] in ("v000001", None):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        triggers = {j["params"]["trigger"] for j in client.get("/v1/jobs", headers=ADMIN).json()}
        assert {"startup", "scheduled"} <= triggers
        assert recommend(client, items=app.state.engine.vocab.tokens[:3])["retrieval_used"] is True


def test_a_failed_rebuild_is_reported_and_changes_nothing(ra_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ra_run, run)
    app = create_app(settings_for(run, tmp_path / "index"))
    with LiveServer(app) as server, client_for(server) as client:
        before = client.get("/v1/index").json()
        (run / "retrieval.pt").write_bytes(b"not a checkpoint")  # the rebuild process reads the run afresh
        job = wait_job(client, client.post("/v1/index/rebuild", headers=ADMIN).json()["url"])
        assert job["status"] == "failed" and "retrieval.pt" in job["error"], job
        assert client.get("/v1/index").json() == before
        assert ArtifactStore(tmp_path / "index").versions() == ["v000001"]
        assert recommend(client, items=app.state.engine.vocab.tokens[:3])["index_version"] == "v000001"
        assert app.state.metrics.registry.get_sample_value("ragrec_index_rebuild_failures_total") == 1
        # the lock was released: the next rebuild may start (and fails the same way)
        assert client.post("/v1/index/rebuild", headers=ADMIN).status_code == 202


def test_without_an_index_it_serves_the_base_model_and_says_so(ra_run: Path, tmp_path: Path, truth: Truth) -> None:
    app = create_app(settings_for(ra_run, tmp_path / "index", build_index_on_start=False))
    with LiveServer(app) as server, client_for(server) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["index"] is False
        assert "index" in ready.json()["detail"]
        user = sorted(truth.histories)[0]
        body = recommend(client, user_id=user, k=5)
        assert body["retrieval_used"] is False and body["index_version"] is None
        assert ids_of(body) == truth.top(truth.histories[user], 5, user=user, retrieval=False)
        job = wait_job(client, client.post("/v1/index/rebuild", headers=ADMIN).json()["url"])
        assert job["status"] == "succeeded"
        assert client.get("/readyz").status_code == 200
        assert recommend(client, user_id=user, k=5)["retrieval_used"] is True


def test_a_head_run_serves_what_its_stage_measured(ra_head_run: Path, tmp_path: Path) -> None:
    """The learned head (copy distribution, own earlier entries kept): the service's split
    evaluation reproduces the stage's own test figures, and explain reports the copy share."""
    app = create_app(settings_for(ra_head_run, tmp_path / "index"))
    with LiveServer(app) as server, client_for(server) as client:
        job = wait_job(client, client.post("/v1/evaluate", json={"split": "test", "bootstrap_resamples": 200},
                                           headers=ADMIN).json()["url"])
        assert job["status"] == "succeeded", job
        trained = json.loads((ra_head_run / "metrics.json").read_text())["test"]
        for side, name in (("with_retrieval", "with"), ("without_retrieval", "without")):
            assert job["result"][side]["NDCG@10"] == pytest.approx(trained[name]["NDCG@10"], abs=1e-6), side
        user = app.state.engine.vocab.tokens[1]
        body = recommend(client, items=app.state.engine.vocab.tokens[1:5], k=3, explain=True)
        assert body["retrieval_used"] is True and body["explanation"]["fusion"]["kind"] == "head"
        assert 0.0 < body["explanation"]["fusion"]["alpha_mean"] < 1.0 and user
