"""The fine-tuning stage's banks: keys encoded by the CURRENT encoder and query encoder,
re-encoded at every rebuild (``ra.rebuild_every_*``), stale in between by design.

Which examples a bank holds is the one rule of ``training/ra/bank.py`` (``bank_entries``,
``check_entries``), shared with the retrieval stage and the service: the validation bank
holds training examples, the test bank adds the validation examples. This stage passes the
training examples it keeps (``BankEntries``: ``ra.bank_min_prefix`` and evictions).

Training queries search the training bank with their own user's present and future
excluded (``exclude_user`` / ``exclude_from_position`` in ``search_neighbours``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retriever import MemoryBank, SearchResult
from training import distributed
from training.data.sequences import SequenceData, Split, gather_items
from training.lifecycle import autocast
from training.ra import bank as rule
from training.ra.encode import encode_prefixes
from training.ra.finetune.entries import BankEntries
from training.ra.finetune.fusion import Neighbours
from training.ra.finetune.model import RAModel


@dataclass
class KeyedBank:
    """A memory bank plus the tensors the model reads by entry id.

    Entry ids are row numbers (the bank is built in one go, never edited), so
    ``keys[I]`` looks up the keys of search results. Keys and values are snapshots
    taken when the bank was built: they go stale between rebuilds by design.
    """

    index: MemoryBank
    keys: torch.Tensor  # (M, D) unit keys, no gradient
    values: torch.Tensor | None  # (M, D) prefix representations h, when values need them
    users: np.ndarray  # (M,) int64 payload, kept for leakage checks
    positions: np.ndarray  # (M,) int64
    examples: np.ndarray | None = None  # (M,) int64 training-example index of each entry (-1: none)

    def __len__(self) -> int:
        return len(self.users)


def search_neighbours(
    model: RAModel,
    bank: KeyedBank,
    h: torch.Tensor,
    k: int,
    *,
    exclude_user: np.ndarray | None = None,
    exclude_from_position: np.ndarray | None = None,
) -> tuple[Neighbours, SearchResult]:
    """Search the bank with the query encoder's queries for h (B, D) and gather the neighbours.

    The search itself is numpy (no gradient); the similarities are recomputed here as
    q · key so the query encoder learns through the attention weights (keys stay fixed).
    exclude_user / exclude_from_position: (B,) int64, passed to ``MemoryBank.search``.
    """
    q = model.query_encoder(h)  # (B, D) unit
    res = bank.index.search(q.detach().float().cpu().numpy(), min(k, len(bank)), exclude_user=exclude_user,
                            exclude_from_position=exclude_from_position)
    dev = h.device
    found = torch.from_numpy(res.found).to(dev)  # (B, K)
    ids = torch.from_numpy(np.maximum(res.I, 0)).to(dev)
    sim = torch.einsum("bd,bkd->bk", q.float(), bank.keys[ids])  # (B, K)
    targets = torch.from_numpy(res.targets).to(dev)
    usefulness = torch.from_numpy(np.nan_to_num(res.quality, nan=-np.inf)).to(dev)
    nb = Neighbours(
        sim=sim.masked_fill(~found, 0.0),
        target_emb=model.encoder.item_emb(targets.clamp(min=0)).to(h.dtype),  # (B, K, D), tied embeddings
        seq_repr=None if bank.values is None else bank.values[ids].to(h.dtype),
        keys=bank.keys[ids],
        usefulness=usefulness,
        valid=found,
    )
    return nb, res


class Banks:
    """Builds the stage's banks from the model's current weights."""

    def __init__(self, model: RAModel, data: SequenceData, split: Split, *, store_values: bool, max_len: int,
                 batch_size: int, precision: str, device: torch.device) -> None:
        self.model, self.data, self.split = model, data, split
        self.store_values = store_values  # ra.values needs each entry's h, not only its target
        self.max_len, self.batch_size, self.precision, self.device = max_len, batch_size, precision, device

    @torch.no_grad()
    def encode(self, users: np.ndarray, positions: np.ndarray, *, recenter: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, key) of each example's prefix with the current weights: two (M, D) float tensors.
        recenter: first set the query encoder's center to the mean h of these examples."""
        self.model.eval()
        with autocast(self.device, self.precision):
            h = encode_prefixes(self.model.encoder, self.data, users, positions, self.max_len,
                                batch_size=self.batch_size, device=self.device)
        if recenter:
            self.model.query_encoder.center.copy_(h.mean(dim=0))
        with autocast(self.device, self.precision):
            keys = torch.cat([self.model.query_encoder(part).float() for part in h.split(self.batch_size)])
        return h, keys

    def build(self, users: np.ndarray, positions: np.ndarray, *, recenter: bool = False,
              usefulness: np.ndarray | None = None, examples: np.ndarray | None = None,
              shared: bool = False) -> KeyedBank:
        """A bank of examples (user, position): key = query_encoder(h of the prefix), payload
        target = the item at that position, usefulness (default 1.0 each). recenter: see
        ``encode`` (training banks only). examples: each entry's training-example index (-1 = none).
        shared: under torchrun rank 0 encodes once and every rank builds the same index."""
        users, positions = np.asarray(users, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        if shared and distributed.active():
            h, keys, center = distributed.computed_on_main(
                lambda: (*self.encode(users, positions, recenter=recenter), self.model.query_encoder.center),
                self.device)
            self.model.query_encoder.center.copy_(center)
        else:
            h, keys = self.encode(users, positions, recenter=recenter)
        return self.from_keys(users, positions, keys, h if self.store_values else None, usefulness, examples)

    def from_keys(self, users, positions, keys, values, usefulness, examples) -> KeyedBank:
        targets = gather_items(self.data, users, positions)
        index = MemoryBank(keys.cpu().numpy(), targets, users, positions, quality=usefulness)
        if examples is None:
            examples = np.full(len(users), -1, dtype=np.int64)
        return KeyedBank(index=index, keys=keys, values=values, users=users, positions=positions, examples=examples)

    def train_bank(self, entries: BankEntries) -> KeyedBank:
        """The training examples the bank holds now, re-encoded; the query encoder's center
        moves to their mean h."""
        ids = entries.ids
        return self.build(self.split.train_users[ids], self.split.train_positions[ids], recenter=True,
                          usefulness=entries.usefulness[ids], examples=ids, shared=True)

    def eval_bank(self, split: str, entries: BankEntries) -> KeyedBank:
        """The bank that evaluates ``split`` ("valid" or "test"), by ``training/ra/bank.py``'s rule.
        Training entries keep their usefulness; validation entries (test bank) start at 1.0."""
        ids = entries.ids
        users, positions = rule.bank_entries(self.data, self.split, split, train_ids=ids)
        n_extra = len(users) - len(ids)
        usefulness = np.concatenate([entries.usefulness[ids], np.ones(n_extra, dtype=np.float32)])
        examples = np.concatenate([ids, np.full(n_extra, -1, dtype=np.int64)])
        bank = self.build(users, positions, usefulness=usefulness, examples=examples)
        rule.check_entries(self.data, self.split, split, bank.users, bank.positions)
        return bank

    def eval_banks(self, entries: BankEntries) -> dict[str, KeyedBank]:
        """Both evaluation banks from one encoding: the test bank is the validation bank plus
        the validation examples, so their keys are encoded once."""
        test = self.eval_bank("test", entries)
        m = len(entries.ids)  # the training entries come first
        valid = self.from_keys(test.users[:m], test.positions[:m], test.keys[:m],
                               None if test.values is None else test.values[:m], entries.usefulness[entries.ids],
                               test.examples[:m])
        rule.check_entries(self.data, self.split, "valid", valid.users, valid.positions)
        return {"valid": valid, "test": test}
