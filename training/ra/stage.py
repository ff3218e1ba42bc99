"""The retrieval stage on a frozen base run: encode once, search once, then vote or train a
head in seconds per epoch.

``prepare(run_dir)`` encodes every training example, validation and test query with the
untouched base in eval mode (one representation per prefix, the same for bank keys and
queries), builds the validation bank (training examples) and the test bank (training +
validation examples), and searches neighbours for every query under one own-user rule.
``train_head`` fits a ``RetrievalHead`` (or ``LayerAdapters``) with CE on the fused
representation, choosing the epoch on validation; ``vote_scores`` and ``TrainedHead.scores``
give (Q, N) ranking scores.

Shapes: Q queries, K neighbours, D hidden size, N items, M bank entries.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import RunError, load_model_file, require_finished_run
from training.config import load_config
from training.data.sequences import SequenceData, Split, Vocabulary, leave_one_out, pad_prefixes
from training.data.source import load_run_data
from training.evaluate import ndcg_at
from training.ra import bank as bk
from training.ra.encode import encode_prefixes
from training.ra.module import LayerAdapters, RetrievalHead, ce_loss, freeze, kl_term
from training.ra.scoring import seen_mask, target_ranks
from training.ra.vote import VoteSettings, vote, vote_distribution

log = logging.getLogger(__name__)


@dataclass
class Queries:
    """One query set: (user, position) pairs, their h, targets and seen items."""

    users: np.ndarray  # (Q,)
    positions: np.ndarray  # (Q,)
    h: torch.Tensor  # (Q, D)
    targets: np.ndarray  # (Q,) item ids
    seen: torch.Tensor | None = None  # (Q, N) bool, built lazily for evaluation sets
    D: np.ndarray | None = None  # (Q, K) neighbours' similarities
    I: np.ndarray | None = None  # (Q, K) neighbour entry ids

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Prepared:
    run: Path
    encoder: object
    data: SequenceData
    split: Split
    vocab: Vocabulary
    banks: dict[str, bk.FrozenBank]
    train: Queries
    valid: Queries
    test: Queries
    own_user: str
    k_train: int
    k_eval: int
    input_len: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def item_emb(self) -> torch.Tensor:
        return self.encoder.item_emb.weight[1:].detach()  # (N, D)

    def base_logits(self, q: Queries) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.scores(q.h)


def load_base(run_dir: str | Path):
    """The base run's frozen encoder, config, data and split; refuses an unfinished run."""
    run = require_finished_run(run_dir, what="base run")
    cfg = load_config(run / "config.yaml")
    if cfg.ra.enabled:
        raise RunError(f"{run} is a retrieval-stage run; the base must be a DuoRec run")
    vocab = Vocabulary.load(run / "items.json")
    data = load_run_data(cfg, item_vocab=vocab, fetch=False)
    encoder, _ = load_model_file(run / "model.pt")
    if encoder.cfg.n_items != data.n_items:
        raise RunError(f"{run}: model has {encoder.cfg.n_items} items, its data {data.n_items}")
    return freeze(encoder), cfg, data, leave_one_out(data), vocab


def _gather(data: SequenceData, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return data.flat[data.offsets[users] + positions].astype(np.int64)


@torch.no_grad()
def prepare(run_dir: str | Path, *, k_train: int = 50, k_eval: int = 100, own_user: str = "keep", m_max: int = 5,
            input_len: int | None = None) -> Prepared:
    """Encode, build both banks and search every query set once. input_len: cut every input
    (bank keys and queries) to its last ``input_len`` items (the sparse protocol); default the
    base's max_len."""
    t0 = time.perf_counter()
    encoder, _cfg, data, split, vocab = load_base(run_dir)
    L = min(input_len or encoder.cfg.max_len, encoder.cfg.max_len)
    dev = torch.device("cpu")
    tu, tp = bk.bank_entries(data, split, "valid")
    vu, vp = split.valid_users.astype(np.int64), split.valid_positions.astype(np.int64)
    su, sp = split.test_users.astype(np.int64), split.test_positions.astype(np.int64)
    users = np.concatenate([tu, vu, su])
    positions = np.concatenate([tp, vp, sp])
    h = encode_prefixes(encoder, data, users, positions, L, batch_size=256, device=dev)
    h_train, h_valid, h_test = h[: len(tu)], h[len(tu): len(tu) + len(vu)], h[len(tu) + len(vu):]
    seconds = {"encode": time.perf_counter() - t0}

    t1 = time.perf_counter()
    banks = {"valid": bk.build_bank(encoder, data, split, "valid", m_max=m_max, h=h_train)}
    # the test bank = training examples + validation examples, in bank_entries' order
    banks["test"] = bk.build_bank(encoder, data, split, "test", m_max=m_max, h=torch.cat([h_train, h_valid]),
                                  center=banks["valid"].center)
    seconds["banks"] = time.perf_counter() - t1

    sets = {
        "train": Queries(tu, tp, h_train, _gather(data, tu, tp)),
        "valid": Queries(vu, vp, h_valid, _gather(data, vu, vp)),
        "test": Queries(su, sp, h_test, _gather(data, su, sp)),
    }
    for name in ("valid", "test"):
        sets[name].seen = seen_mask(data, sets[name].users, sets[name].positions)
    prep = Prepared(Path(run_dir), encoder, data, split, vocab, banks, sets["train"], sets["valid"],
                    sets["test"], own_user, k_train, k_eval, input_len=L, seconds=seconds)
    research(prep, own_user)
    log.info("prepared %s: %d training queries, banks %d/%d, %.1fs", run_dir, len(tu), len(banks["valid"]),
             len(banks["test"]), time.perf_counter() - t0)
    return prep


def research(prep: Prepared, own_user: str, *, train: bool = True) -> Prepared:
    """Search every query set again (after a change of rule or keys), in place."""
    t = time.perf_counter()
    prep.own_user = own_user
    for name in ("train", "valid", "test") if train else ("valid", "test"):
        k = prep.k_train if name == "train" else prep.k_eval
        search_neighbours(bank_for(prep, name), queries_for(prep, name), k, own_user)
    prep.seconds["search"] = time.perf_counter() - t
    return prep


def with_rule(prep: Prepared, own_user: str) -> Prepared:
    """A copy of ``prep`` whose neighbours follow another own-user rule (tensors shared)."""
    new = copy.copy(prep)
    new.train, new.valid, new.test = (copy.copy(q) for q in (prep.train, prep.valid, prep.test))
    new.seconds = dict(prep.seconds)
    return research(new, own_user)


def search_neighbours(bank: bk.FrozenBank, q: Queries, k: int, own_user: str, *, chunk: int = 8192) -> None:
    keys = bank.query_keys(q.h)
    Ds, Is = [], []
    for s in range(0, len(q), chunk):
        D, I = bk.search(bank, keys[s:s + chunk], q.users[s:s + chunk], q.positions[s:s + chunk], k, own_user)
        Ds.append(D)
        Is.append(I)
    q.D, q.I = np.concatenate(Ds), np.concatenate(Is)


def bank_for(prep: Prepared, which: str) -> bk.FrozenBank:
    return prep.banks["test" if which == "test" else "valid"]


def queries_for(prep: Prepared, which: str) -> Queries:
    return {"train": prep.train, "valid": prep.valid, "test": prep.test}[which]


# ------------------------------------------------------------------ the vote


def vote_scores(prep: Prepared, which: str, s: VoteSettings, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, N) interpolated probabilities of a query set under vote settings ``s``."""
    q = queries_for(prep, which)
    logits = prep.base_logits(q) if logits is None else logits
    items = bk.visible_next(bank_for(prep, which), q.I[:, : s.k], q.users, q.positions, s.m)
    return torch.from_numpy(vote(logits, q.D, items, s, seen=q.seen).scores)


# ------------------------------------------------------------------ the learned head


@dataclass
class HeadSettings:
    """What ``train_head`` needs; built by ``RetrievalSection.head_settings`` (training/ra/config.py),
    where every default and its meaning live."""

    fusion: str
    alpha: float
    k: int
    n_layers: int
    n_heads: int
    dropout: float
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int
    kl_weight: float
    kl_direction: str
    vote_channel: bool
    copy_items: bool
    vote: VoteSettings
    mask_seen_in_loss: bool
    multi_layer: bool
    samples_per_epoch: int | None
    lr_schedule: str
    seed: int


def _neighbour_tensors(prep: Prepared, which: str, rows: np.ndarray, k: int):
    q, bank = queries_for(prep, which), bank_for(prep, which)
    I = q.I[rows, :k]
    ids = torch.from_numpy(np.maximum(I, 0))
    mask = torch.from_numpy(I >= 0)
    keys = bank.h[ids]  # (B, K, D) the neighbours' prefix representations
    targets = torch.from_numpy(bank.next_items[np.maximum(I, 0), 0])
    values = prep.encoder.item_emb.weight.detach()[targets]  # (B, K, D) their next item's embedding
    sim = torch.from_numpy(np.where(I >= 0, q.D[rows, :k], 0.0).astype(np.float32))
    return keys, values, sim, mask, targets.masked_fill(~mask, 0)


def _seen_rows(prep: Prepared, which: str, rows: np.ndarray) -> torch.Tensor:
    q = queries_for(prep, which)
    if q.seen is not None:
        return q.seen[torch.from_numpy(rows)]
    return seen_mask(prep.data, q.users[rows], q.positions[rows])


def _log_vote(prep: Prepared, which: str, rows: np.ndarray, v: VoteSettings, seen: torch.Tensor) -> torch.Tensor:
    q, bank = queries_for(prep, which), bank_for(prep, which)
    items = bk.visible_next(bank, q.I[rows, : v.k], q.users[rows], q.positions[rows], v.m)
    p = vote_distribution(q.D[rows, : v.k], items, prep.data.n_items, tau=v.tau, decay=v.decay, seen=seen)
    return torch.log(p + 1e-6)


class TrainedHead:
    """A fitted head and how to score a query set with it."""

    def __init__(self, prep: Prepared, settings: HeadSettings, head: torch.nn.Module) -> None:
        self.prep, self.s, self.head = prep, settings, head

    def forward(self, which: str, rows: np.ndarray, *, seen: torch.Tensor | None = None):
        prep, s = self.prep, self.s
        q = queries_for(prep, which)
        keys, values, sim, mask, targets = _neighbour_tensors(prep, which, rows, s.k)
        if s.multi_layer:
            seq = torch.from_numpy(pad_prefixes(prep.data, q.users[rows], q.positions[rows], prep.input_len)[0])
            z = self.head(prep.encoder, seq, keys, values, sim, mask)
            scores = z @ prep.item_emb.T
            return scores, None, targets, mask
        h = q.h[torch.from_numpy(rows)]
        z, _ = self.head(h, keys, values, sim, mask)
        log_vote = None
        if s.vote_channel:
            log_vote = _log_vote(prep, which, rows, s.vote, seen if seen is not None else _seen_rows(prep, which, rows))
        scores = self.head.scores(z, prep.item_emb, log_vote, (targets, sim, mask))
        return scores, self.head.reader.weights, targets, mask

    @torch.no_grad()
    def scores(self, which: str, batch: int = 1024) -> torch.Tensor:
        self.head.eval()
        q = queries_for(self.prep, which)
        out = [self.forward(which, np.arange(i, min(i + batch, len(q))))[0] for i in range(0, len(q), batch)]
        return torch.cat(out)


def train_head(prep: Prepared, s: HeadSettings, *, log_every: bool = True) -> tuple[TrainedHead, list[dict]]:
    """Fit on the training queries (validation bank, own future excluded), keep the epoch
    with the best masked validation NDCG@10."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    dim = prep.encoder.cfg.dim
    if s.k > prep.k_train:
        raise RunError(f"head k={s.k} exceeds the neighbours searched per training query ({prep.k_train})")
    if s.multi_layer:
        head: torch.nn.Module = LayerAdapters(prep.encoder, n_heads=s.n_heads, dropout=s.dropout)
    else:
        head = RetrievalHead(dim, fusion=s.fusion, alpha=s.alpha, n_layers=s.n_layers, n_heads=s.n_heads,
                             dropout=s.dropout, vote_channel=s.vote_channel, copy_items=s.copy_items)
    trained = TrainedHead(prep, s, head)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    n = len(prep.train)
    per_epoch = math.ceil(min(s.samples_per_epoch or n, n) / s.batch_size)
    total = max(per_epoch * s.epochs, 1)
    if s.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be cosine or constant, got {s.lr_schedule!r}")
    # the last epochs see a small rate: without it the validation curve jumps with whichever
    # random subset came last (seen on ML-100K: +-0.004 NDCG@10 between neighbouring epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) if s.lr_schedule == "cosine" else 1.0)
    best, best_state, bad, history = -math.inf, None, 0, []
    for epoch in range(s.epochs):
        t0 = time.perf_counter()
        head.train()
        order = rng.permutation(n)[: s.samples_per_epoch or n]
        loss_sum, steps = 0.0, 0
        for i in range(0, len(order), s.batch_size):
            rows = np.sort(order[i:i + s.batch_size])
            seen = _seen_rows(prep, "train", rows) if (s.mask_seen_in_loss or s.vote_channel) else None
            scores, weights, ntargets, mask = trained.forward("train", rows, seen=seen)
            tgt = torch.from_numpy(prep.train.targets[rows])
            loss = ce_loss(scores, tgt, seen if s.mask_seen_in_loss else None)
            if s.kl_weight > 0 and weights is not None:
                base = prep.encoder.scores(prep.train.h[torch.from_numpy(rows)])
                loss = loss + s.kl_weight * kl_term(weights, base, ntargets, mask, s.kl_direction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            steps += 1
        train_s = time.perf_counter() - t0
        ranks = target_ranks(trained.scores("valid"), prep.valid.targets, prep.valid.seen)
        score = float(ndcg_at(ranks, 10).mean())
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(steps, 1), "valid_ndcg10_masked": score,
                        "seconds": train_s})
        if log_every:
            log.info("head epoch %d: loss %.4f, valid NDCG@10 (masked) %.4f, %.1fs", epoch + 1,
                     loss_sum / max(steps, 1), score, train_s)
        if score > best:
            best, best_state, bad = score, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= s.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return trained, history
