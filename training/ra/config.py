"""Typed configuration of the retrieval stage (``configs/ml100k-ra.yaml``).

The stage takes its data, model and vocabulary from the base run, so the file holds a
``retrieval`` section only: a key of another section (``train.lr``, ``loss.*``, ...) would
be silently ignored, so it is an error that names it. Unknown keys are errors too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from training.config import ConfigError, _format_error, _Strict, apply_overrides
from training.ra.stage import HeadSettings
from training.ra.vote import VoteSettings


class VoteSection(_Strict):
    k: int = Field(100, ge=1)  # neighbours that vote
    m: int = Field(3, ge=1, le=5)  # next items per neighbour
    tau: float = Field(0.1, gt=0)  # similarity temperature
    decay: float = Field(0.5, gt=0, le=1)  # weight of a neighbour's j-th next item: decay^j
    T: float = Field(1.0, gt=0)  # temperature of the model's softmax
    lam: float = Field(0.1, ge=0, le=1)  # share of the vote
    beta: float = Field(0.0, ge=0)  # confidence slope of λ (0: constant)
    # validation grids: each listed value is tried (one axis at a time, in this order) and the
    # best on validation NDCG@10 (seen items masked) is kept; empty = keep the value above
    tune_lam: list[float] = Field(default_factory=list)
    tune_k: list[int] = Field(default_factory=list)
    tune_m: list[int] = Field(default_factory=list)
    tune_tau: list[float] = Field(default_factory=list)
    tune_T: list[float] = Field(default_factory=list)
    tune_beta: list[float] = Field(default_factory=list)

    def settings(self) -> VoteSettings:
        return VoteSettings(k=self.k, m=self.m, tau=self.tau, decay=self.decay, T=self.T, lam=self.lam,
                            beta=self.beta)


class HeadSection(_Strict):
    fusion: Literal["fixed", "adaptive", "gated", "attention"] = "fixed"
    alpha: float = Field(0.5, gt=0, lt=1)  # fixed alpha / starting alpha of the others
    k: int = Field(20, ge=1)  # neighbours the reader attends over
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(6, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(512, ge=1)
    patience: int = Field(2, ge=1)
    kl_weight: float = Field(0.0, ge=0)  # auxiliary KL between reader attention and the base
    kl_direction: Literal["forward", "reverse", "js"] = "forward"
    vote_channel: bool = False  # add w · log p_kNN (the vote section's k, m, tau, decay) to the scores
    copy_items: bool = False  # mix in a copy of the neighbours' next items by the reader's attention (learned gate)
    mask_seen_in_loss: bool = True
    multi_layer: bool = False  # fuse after every frozen block instead of once on h
    samples_per_epoch: int | None = Field(None, ge=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine: decays to 0 over the epochs


class RetrievalSection(_Strict):
    base: str = "runs/accurate"  # the finished DuoRec run retrieval is added to (frozen)
    design: Literal["vote", "head", "none"] = "vote"  # what "with retrieval" serves
    own_user: Literal["keep", "exclude"] = "keep"  # a user's own earlier entries: retrievable or not
    k_search: int = Field(100, ge=1)  # neighbours searched per evaluation query
    k_train: int = Field(50, ge=1)  # neighbours searched per training query (the head's k at most)
    m_max: int = Field(5, ge=1, le=5)  # next items kept per bank entry
    input_len: int | None = Field(None, ge=1)  # cut every input to its last n items (sparse protocol)
    trained_keys: bool = False  # search with a key projection trained for the task (training/ra/keys.py)
    seed: int = 0
    vote: VoteSection = Field(default_factory=VoteSection)
    head: HeadSection = Field(default_factory=HeadSection)

    @model_validator(mode="after")
    def _fits(self) -> RetrievalSection:
        if self.design == "vote" and (self.vote.k > self.k_search or any(k > self.k_search for k in self.vote.tune_k)):
            raise ValueError(f"retrieval.vote.k (and tune_k) must be <= k_search={self.k_search}")
        if self.design == "head" and self.head.k > self.k_train:
            raise ValueError(f"retrieval.head.k={self.head.k} must be <= k_train={self.k_train}")
        if self.design == "head" and self.head.vote_channel and self.vote.k > self.k_train:
            raise ValueError(f"retrieval.head.vote_channel needs vote.k <= k_train={self.k_train}")
        return self

    def head_settings(self) -> HeadSettings:
        h = self.head
        return HeadSettings(fusion=h.fusion, alpha=h.alpha, k=h.k, n_layers=h.n_layers, n_heads=h.n_heads,
                            dropout=h.dropout, epochs=h.epochs, lr=h.lr, weight_decay=h.weight_decay,
                            batch_size=h.batch_size, patience=h.patience, kl_weight=h.kl_weight,
                            kl_direction=h.kl_direction, vote_channel=h.vote_channel, copy_items=h.copy_items,
                            vote=self.vote.settings(), mask_seen_in_loss=h.mask_seen_in_loss,
                            multi_layer=h.multi_layer, samples_per_epoch=h.samples_per_epoch,
                            lr_schedule=h.lr_schedule, seed=self.seed)


class RetrievalConfig(_Strict):
    retrieval: RetrievalSection = Field(default_factory=RetrievalSection)


def is_retrieval_config(raw: dict[str, Any]) -> bool:
    return isinstance(raw, dict) and "retrieval" in raw


def load_retrieval_config(path: str | Path | None = None, overrides: list[str] | None = None,
                          raw: dict[str, Any] | None = None) -> RetrievalConfig:
    """Read a retrieval-stage YAML (or ``raw``), apply ``key=value`` overrides, validate."""
    if raw is None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    other = sorted(k for k in raw if k != "retrieval")
    if other:
        ignored = [f"{k}.*" if isinstance(raw[k], dict) else k for k in other]
        raise ConfigError(f"{path}: the retrieval stage takes data and model from its base run and ignores "
                          f"{', '.join(ignored)}; remove them (or train a base run with them)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RetrievalConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_format_error(exc)}") from None
