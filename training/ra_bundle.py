"""A finished retrieval-augmented run as the service uses it: load ``ra.pt``, encode
prefixes into (h, key) pairs, and turn a memory-bank search result into ``Neighbours``.

Training builds neighbours with gradients through the similarities (``search_neighbours``);
serving needs none, so the similarities are the ones the index returned.

Shapes: M sequences, B queries, K neighbours, D hidden size.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever import SearchResult
from training.fusion import Neighbours
from training.model import ModelConfig, SequenceEncoder
from training.ra_bank import encode_prefixes
from training.ra_model import RAModel, build_ra_model
from training.ra_trainer import RA_FORMAT
from training.run import RunError


def load_ra_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[RAModel, dict[str, Any]]:
    """Rebuild the RA model saved in ``ra.pt`` (or a run directory holding one), in eval mode,
    with the schedule (temperature, alpha cap) of its best epoch. Weights-only unpickling."""
    path = Path(path)
    file = path / "ra.pt" if path.is_dir() else path
    try:
        blob = torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"no retrieval-augmented model at {file}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # truncated, corrupted, foreign
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{file} is not a readable ragrec RA model file ({reason[:120]})") from None
    if not isinstance(blob, dict) or blob.get("format") != RA_FORMAT:
        raise RunError(f"{file} is not a ragrec RA model file (format "
                       f"{blob.get('format') if isinstance(blob, dict) else '?'})")
    model = build_ra_model(SequenceEncoder(ModelConfig(**blob["model_config"])), blob["ra_config"])
    model.load_state_dict(blob["model"], strict=True)
    model.set_schedule(**blob["schedule"])
    return model.eval(), blob


def bank_stores_values(ra_config: dict[str, Any]) -> bool:
    """Whether the run's knowledge vector reads neighbours' prefix representations, which its
    banks must then store beside the keys."""
    return ra_config.get("values", "target") != "target"


@torch.no_grad()
def encode_examples(model: RAModel, sequences: Sequence[np.ndarray], rows: np.ndarray, positions: np.ndarray, *,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(h, keys) of the prefixes sequences[rows[m]][:positions[m]] (truncated to the model's
    max_len), two (M, D) float32 arrays; keys are the retriever's unit search vectors. Uses the
    training stage's ``encode_prefixes``: one causal pass serves all prefixes of a window."""
    device = next(model.parameters()).device
    h = encode_prefixes(model.encoder, sequences, rows, positions, model.encoder.cfg.max_len,
                        batch_size=batch_size, device=device)
    keys = torch.cat([model.retriever(part) for part in h.split(4096)])
    return h.cpu().numpy(), keys.float().cpu().numpy()


def neighbours_from_result(model: RAModel, res: SearchResult, *, keys: np.ndarray | None = None,
                           device: str | torch.device = "cpu") -> Neighbours:
    """``Neighbours`` for a search result: similarities as returned (no gradient), the targets'
    embeddings, banked prefix representations when the bank stores values, and (B, K, D) keys
    when given (cross-attention retrieval reads them)."""
    found = torch.from_numpy(res.found).to(device)  # (B, K)
    targets = torch.from_numpy(np.maximum(res.targets, 0)).to(device)
    quality = None if res.quality is None else torch.from_numpy(
        np.nan_to_num(res.quality, nan=-np.inf).astype(np.float32)).to(device)
    sim = torch.from_numpy(np.nan_to_num(res.D, neginf=0.0).astype(np.float32)).to(device)
    return Neighbours(
        sim=sim.masked_fill(~found, 0.0),
        target_emb=model.encoder.item_emb(targets).float(),  # (B, K, D), tied embeddings
        seq_repr=None if res.values is None else torch.from_numpy(res.values).float().to(device),
        keys=None if keys is None else torch.from_numpy(keys).float().to(device),
        quality=quality,
        valid=found,
    )
