"""Service settings: one pydantic-settings class, read from ``RAGREC_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service can be told. ``Settings(run_dir=...)`` in tests, the environment in production."""

    model_config = SettingsConfigDict(env_prefix="RAGREC_", extra="forbid")

    run_dir: Path  # a finished `ragrec train` run: config.yaml, model.pt, items.json
    redis_url: str | None = None  # None: the in-process store (one replica only)
    redis_prefix: str = "ragrec"  # every Redis key starts with this; lets services share a Redis
    redis_timeout_s: float = Field(0.5, gt=0)  # a dead Redis must fail fast (the API answers 503)
    api_key: str | None = None  # required by admin endpoints (none exist yet); None disables them
    max_batch: int = Field(64, ge=1)  # requests per POST /v1/recommend/batch
    max_events: int = Field(1000, ge=1)  # events per POST /v1/events
    max_body_bytes: int = Field(1 << 20, ge=1)  # larger request bodies get 413
    max_history: int | None = Field(None, ge=1)  # stored events per user; None: the model's max_len
    cache_ttl_s: float = Field(30.0, gt=0)  # lifetime of cached POST /v1/recommend answers
    batch_wait_ms: float = Field(2.0, ge=0)  # micro-batcher: longest wait for company after a request
    batch_max_size: int = Field(64, ge=1)  # micro-batcher: most requests in one forward pass
    device: str = "cpu"  # torch device for inference
