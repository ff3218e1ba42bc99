"""Typed run configuration: YAML file plus ``key=value`` overrides.

Unknown keys and wrong types are errors (``ConfigError``), never a silent default.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from training.model import ModelConfig


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str = "data/ml-100k/ml-100k.inter"  # .inter, .csv or .parquet
    source: Literal["file", "ml-100k"] = "file"  # "ml-100k" fetches the file into path's folder if missing
    format: Literal["inter", "csv", "parquet"] | None = None  # None: from the file suffix
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    k_core: int = Field(0, ge=0)  # 0 = no filtering
    max_seq_len: int = Field(50, ge=1)  # longest input prefix


class _ModelSectionBase(_Strict):
    @model_validator(mode="after")
    def _builds(self) -> _ModelSectionBase:
        ModelConfig(n_items=1, max_len=1, **self.model_dump())  # its checks (dim % n_heads, ranges)
        return self


def _section_of(dc: type, skip: tuple[str, ...]) -> type[_Strict]:
    """A strict pydantic section with the fields (types, defaults) of dataclass ``dc``."""
    hints = typing.get_type_hints(dc, include_extras=True)  # with the Annotated bounds
    fields: dict[str, Any] = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(dc) if f.name not in skip}
    return create_model(f"{dc.__name__}Section", __base__=_ModelSectionBase, **fields)


# model: every field of training/model.py's ModelConfig, with its default, except the sizes the
# data decides (n_items from the vocabulary, max_len = data.max_seq_len) and the two numerical
# constants no experiment here varies (layer_norm_eps, init_std)
ModelSection = _section_of(ModelConfig, skip=("n_items", "max_len", "layer_norm_eps", "init_std"))


class LossConfig(_Strict):
    contrastive: Literal["none", "un", "su", "us", "us_x"] = "us"  # "none" trains plain SASRec
    tau: float = Field(1.0, gt=0.0)  # InfoNCE temperature
    sim: Literal["dot", "cos"] = "dot"
    lmd: float = Field(0.1, ge=0.0)  # weight of the unsupervised (dropout-view) term
    lmd_sem: float = Field(0.1, ge=0.0)  # weight of the supervised (same-target) term
    mask_false_negatives: bool = True  # same-target samples are not in-batch negatives
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # of the recommendation CE over all items
    # leave the input's own items out of the recommendation softmax (never the target): a base
    # that learns not to repeat its input, as ML-100K users never do and the service never shows
    mask_seen: bool = False


class TrainConfig(_Strict):
    # "prefix": every training prefix is one sample, as RecBole does (passes shared among
    # the prefixes of a user that fit one window). "window": every position of each user's
    # windows is supervised in one pass (SASRec's original recipe; far fewer passes).
    mode: Literal["prefix", "window"] = "prefix"
    # window mode: supervised positions per window (None = max_seq_len). Smaller chunks give each
    # target a longer input (at least max_seq_len - chunk + 1 items) for more passes per epoch.
    window_chunk: int | None = Field(None, ge=1)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)  # samples (supervised positions) per step
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    grad_clip: float | None = Field(None, gt=0.0)
    # exponential moving average of the weights, per step (e.g. 0.999); validation, model.pt and the
    # final metrics use the averaged weights. None = off.
    ema: float | None = Field(None, gt=0.0, lt=1.0)
    patience: int = Field(10, ge=1)  # epochs without a better validation NDCG@10
    # multiply the learning rate by lr_decay after every lr_patience epochs without a better
    # validation NDCG@10 (None = constant rate); early stopping still waits ``patience`` epochs
    lr_patience: int | None = Field(None, ge=1)
    lr_decay: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 2026
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (CPU AMX / GPU)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None = library default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shuffle_targets: bool = False  # sanity mode: shuffled, relabelled training targets; must score at chance
    max_minutes: float | None = Field(None, gt=0.0)  # stop after this wall time (keeps best)
    tensorboard: bool = True  # per-epoch scalars in <run>/tb/ too, when tensorboard is installed


class EvalConfig(_Strict):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    mask_seen: bool = False  # mask items already in the input (off: the standard protocol)
    batch_size: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _needs_10(self) -> EvalConfig:
        if 10 not in self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be positive and include 10 (early stopping uses NDCG@10), got {self.ks}")
        return self


class UnfreezePhase(_Strict):
    until_epoch: int = Field(ge=1)  # the phase covers the RA epochs up to this one (epochs count from 1)
    # submodules that train: "encoder" (or e.g. "encoder.blocks.1"), "query_encoder", "attention",
    # "fusion"; "" = everything
    train: list[str]
    lr_mult: float = Field(1.0, gt=0.0)


class RAConfig(_Strict):
    """Stage 2: retrieval-augmented fine-tuning of a finished DuoRec run (``ragrec train``
    runs it instead of pretraining when ``enabled``; ``training/ra/finetune/``). Data and model
    come from the pretrained run. The defaults below are the only ones: ``build_ra_model`` takes
    this section as it is."""

    enabled: bool = False
    pretrained: str | None = None  # DuoRec run directory (or its model.pt)
    k: int = Field(20, ge=1)  # neighbours per query
    # how r is built: "similarity" = softmax(sim / τ) over the neighbours (values below);
    # "cross_attention" = learned query/key projections over the neighbour keys, values = targets
    attention: Literal["similarity", "cross_attention"] = "similarity"
    fusion: Literal["fixed", "adaptive", "gated", "attention", "entropy"] = "gated"
    values: Literal["target", "sequence", "both"] = "target"  # what a neighbour contributes to r
    match_norm: bool = True  # rescale r to |h| before fusion (r is ~30x shorter than h otherwise)
    temperature_t0: float = Field(0.1, gt=0.0)  # attention softmax temperature at RA epoch 1
    temperature_decay: float = Field(0.95, gt=0.0, le=1.0)  # per epoch
    temperature_min: float = Field(0.05, gt=0.0)
    entropy_gain: float = Field(0.0, ge=0.0)  # per-query τ·(1 + gain·H), H = normalised attention entropy; 0 = off
    fusion_temperature: float | None = Field(None, gt=0.0)  # gate/attention/adaptive/entropy fusion; None = its default
    alpha_max: float = Field(0.5, ge=0.0, le=1.0)  # cap on the retrieval side's weight
    alpha_warmup_epochs: int = Field(2, ge=0)  # alpha_max, enhanced weight: target/n at epoch 1, 2·target/n, ...
    enhanced_weight: float = Field(1.0, ge=0.0)  # weight of CE on the fused representation
    kl_weight: float = Field(0.05, ge=0.0)  # weight of the KL term between attention and usefulness (small)
    kl_direction: Literal["forward", "reverse", "js"] = "forward"
    # usefulness of a neighbour to a query (the KL teacher): "score" = the recommender's score of
    # its target, "similarity" = cosine of its target's embedding with the true item's, "match" =
    # 1 if it is the true item
    usefulness: Literal["score", "similarity", "match"] = "score"
    # each retrieved entry's usefulness <- EMA of its share under the teacher (n_used · probability,
    # so 1 = a fair share; entries start at 1)
    usefulness_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    usefulness_threshold: float | None = None  # neighbours whose entry usefulness is below it are masked
    evict_below: float | None = None  # entries under this usefulness leave the bank at the next rebuild, for good
    bank_min_prefix: int = Field(1, ge=1)  # bank entries need a prefix of at least this many items
    # loss gate: an example whose gate score is below the threshold drops its enhanced CE and KL
    # terms; gate score = attention-weighted neighbour similarity or entry usefulness
    loss_gate_threshold: float | None = None
    loss_gate_by: Literal["similarity", "usefulness"] = "similarity"
    query_warmup_epochs: int = Field(0, ge=0)  # contrastive warm-up of the query encoder before epoch 1; 0 = off
    query_warmup_lr: float | None = Field(None, gt=0.0)  # None = ra.lr
    rebuild_every_early: int = Field(1, ge=1)  # re-encode the bank's keys every n epochs during the early epochs
    rebuild_early_epochs: int = Field(5, ge=0)  # how many epochs are early (keys drift fastest then)
    rebuild_every_late: int = Field(3, ge=1)  # rebuild interval after them (epoch 1 always builds)
    epochs: int = Field(20, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    fusion_lr: float | None = Field(None, gt=0.0)  # the fusion's own optimizer group (not scaled by lr_mult); None = lr
    patience: int = Field(5, ge=1)  # epochs without a better validation NDCG@10 (with retrieval)
    unfreeze: list[UnfreezePhase] = Field(default_factory=list)  # empty: everything trains throughout

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> RAConfig:
        if self.enabled and not self.pretrained:
            raise ValueError("ra.enabled needs ra.pretrained (a DuoRec run directory or model.pt)")
        ends = [p.until_epoch for p in self.unfreeze]
        if any(b <= a for a, b in itertools.pairwise(ends)):
            raise ValueError(f"ra.unfreeze until_epoch values must increase, got {ends}")
        if self.attention == "cross_attention" and (self.values != "target" or self.entropy_gain > 0):
            raise ValueError("ra.attention=cross_attention attends over target embeddings with a learned "
                             f"score: it needs ra.values=target and ra.entropy_gain=0 (got {self.values!r}, "
                             f"{self.entropy_gain})")
        return self


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ra: RAConfig = Field(default_factory=RAConfig)

    @model_validator(mode="after")
    def _chunk_fits(self) -> RunConfig:
        chunk = self.train.window_chunk
        if chunk is not None and chunk > self.data.max_seq_len:
            raise ValueError(f"train.window_chunk ({chunk}) cannot exceed data.max_seq_len ({self.data.max_seq_len})")
        return self


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            parts.append(f"'{loc}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.01' -> (['train', 'lr'], 0.01). The value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path) if path else "overrides")


# A run directory's config.yaml is the whole config as the code of its day wrote it. Keys
# renamed since are read under their new name; keys retired since are dropped while they hold
# the value that code used (so they change nothing), and refused, by name, otherwise.
RENAMED = {"ra.retrieval": "attention", "ra.quality_threshold": "usefulness_threshold",
           "ra.rebuild_switch_epoch": "rebuild_early_epochs", "ra.retriever_warmup_epochs": "query_warmup_epochs",
           "ra.retriever_warmup_lr": "query_warmup_lr"}
RETIRED = {"loss.cl_batch": None, "train.compile": False, "train.eval_every": 1, "model.layer_norm_eps": 1e-12,
           "model.init_std": 0.02, "ra.usefulness_temperature": 1.0, "ra.retriever_warmup_tau": 0.1}


def _upgrade(raw: dict[str, Any], source: str) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, new in RENAMED.items():
        section, name = key.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and name in node and new not in node:
            node[new] = node.pop(name)
    for key, used in RETIRED.items():
        section, name = key.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and name in node:
            if node[name] != used:
                raise ConfigError(f"{source}: '{key}' was removed (only {used!r} is supported now), got {node[name]!r}")
            del node[name]
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    raw = _upgrade(raw, source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(exc)}") from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    from training.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(), sort_keys=False))
