"""DuoRec: a SASRec-style causal transformer with DuoRec's contrastive regularisation.

Read top to bottom: config, attention, feed-forward, block, encoder, losses.

Sequences are LEFT-aligned: column 0 holds the oldest kept item and padding (id 0)
follows the last real item. With a causal mask the output at column t depends only
on columns 0..t, so one pass over a window yields the representation of every
prefix of that window. The trainer uses that to share one pass among the prefixes
of a user, and ``select`` lets the last layer compute only the rows it is asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import nn


@dataclass
class ModelConfig:
    """The encoder's shape and regularisation: the one home of these defaults. The config
    file's ``model`` section is derived from this class (``training/config.py``), so every
    field but ``n_items`` and ``max_len`` (from the data) can be set there. The ``Annotated``
    bounds are what the config file checks; ``__post_init__`` checks them here too."""

    n_items: int  # catalogue size, padding excluded (item ids are 1..n_items)
    max_len: int  # longest input prefix (data.max_seq_len); longer prefixes keep their last max_len items
    dim: Annotated[int, Ge(1)] = 64  # hidden size; item embeddings are tied with the output layer
    n_layers: Annotated[int, Ge(1)] = 2  # transformer blocks
    n_heads: Annotated[int, Ge(1)] = 2  # attention heads; dim must divide evenly
    inner: Annotated[int, Ge(1)] = 256  # feed-forward width
    dropout: Annotated[float, Ge(0.0), Lt(1.0)] = 0.5  # on embeddings and residual branches (DuoRec on sparse data)
    attn_dropout: Annotated[float, Ge(0.0), Lt(1.0)] = 0.5  # on attention probabilities
    activation: Literal["gelu", "relu"] = "gelu"
    layer_norm_eps: Annotated[float, Gt(0.0)] = 1e-12  # BERT-style post-LN epsilon
    init_std: Annotated[float, Gt(0.0)] = 0.02  # normal init for linear and embedding weights
    # "absolute": learned position embeddings of the window's columns (SASRec/DuoRec);
    # "relative": no position embeddings, a learned per-head attention bias by distance (how
    # many items back a key is from the query); "both". The bias depends only on the query's
    # column minus the key's, so a causal pass still serves every prefix of its window.
    position: Literal["absolute", "relative", "both"] = "absolute"

    def __post_init__(self) -> None:
        for name in ("n_items", "max_len", "dim", "n_layers", "n_heads", "inner"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("layer_norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        for name in ("dropout", "attn_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    def to_dict(self) -> dict:
        return asdict(self)

    def matches(self, saved: dict) -> bool:
        """Whether a checkpoint's ``model_config`` describes this model; fields added since it
        was written count with their defaults."""
        return ModelConfig(**saved).to_dict() == self.to_dict()


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
POSITIONS = ("absolute", "relative", "both")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout. On CPU the mask comes from 16-bit random integers.

    PyTorch's CPU ``bernoulli_`` draws one random number per element and took a third of
    a training step here (a profile of RecBole's DuoRec showed the same); slicing random
    64-bit words into four 16-bit lanes gives the same mask distribution (p resolved to
    1/65536) about five times faster. On GPU the library kernel is already fast.
    """
    if not training or p == 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, True)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    keep = lanes >= round(p * 65536) - 32768
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v over the allowed keys, with dropout p on the probabilities.

    q: (..., Lq, d); k, v: (..., Lk, d); mask broadcastable to (..., Lq, Lk): bool (True =
    allowed), float (added to the scores; -inf = not allowed), or None for a causal mask
    (Lq == Lk). Without dropout (or on GPU) this is the fused library kernel; with CPU
    dropout it is written out so the mask uses ``dropout``.
    """
    if p == 0.0 or q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return dropout(torch.softmax(scores, dim=-1), p, True) @ v


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.dropout = Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        # (H, max_len) bias by distance query column - key column; starts at 0 (plain attention)
        self.recency = nn.Parameter(torch.zeros(cfg.n_heads, cfg.max_len)) if cfg.position != "absolute" else None

    def _bias(self, cols: torch.Tensor, length: int) -> torch.Tensor:
        """Additive mask for queries at ``cols`` (Q,) over keys 0..length-1: (H, Q, length)."""
        assert self.recency is not None
        dist = cols.unsqueeze(1) - torch.arange(length, device=cols.device)  # (Q, length)
        bias = self.recency[:, dist.clamp(min=0)]  # (H, Q, length)
        return bias.masked_fill(dist < 0, float("-inf"))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., L, D) -> (..., H, L, D/H)
        *lead, length, dim = x.shape
        return x.view(*lead, length, self.n_heads, dim // self.n_heads).transpose(-3, -2)

    def forward(self, x: torch.Tensor, select: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x: (B, L, D). With ``select=(rows, cols)`` only those P query rows are computed: (P, D)."""
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        p = self.attn_dropout if self.training else 0.0
        if select is None:
            # Causal mask only: with left alignment a real query never sees padding.
            length = x.shape[1]
            mask = None if self.recency is None else self._bias(torch.arange(length, device=x.device), length)
            y = attention(self._heads(q), self._heads(k), self._heads(v), mask, p)
            y = y.transpose(1, 2).reshape(x.shape)  # (B, L, D)
            residual = x
        else:
            rows, cols = select
            _, length, dim = x.shape
            flat = rows * length + cols  # index_select: its backward (index_add) is far cheaper than x[rows, cols]'s
            qs = self._heads(q.reshape(-1, dim).index_select(0, flat).unsqueeze(1))  # (P, H, 1, D/H)
            ks = self._heads(k.index_select(0, rows))  # (P, H, L, D/H)
            vs = self._heads(v.index_select(0, rows))
            if self.recency is None:
                mask = (torch.arange(length, device=x.device) <= cols.unsqueeze(1))[:, None, None, :]  # (P,1,1,L)
            else:
                mask = self._bias(cols, length).transpose(0, 1).unsqueeze(2)  # (P, H, 1, L)
            y = attention(qs, ks, vs, mask, p)
            y = y.reshape(-1, dim)  # (P, D); no len(): an exported graph keeps P symbolic
            residual = x.reshape(-1, dim).index_select(0, flat)
        return self.norm(residual + self.dropout(self.out(y)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.inner)
        self.down = nn.Linear(cfg.inner, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.down(self.act(self.up(x)))))


class Block(nn.Module):
    """Post-LN transformer block (attention then feed-forward), as in SASRec/DuoRec."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, select: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.ffn(self.attn(x, select))


class SequenceEncoder(nn.Module):
    """Item + position embeddings, causal transformer, tied output embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim) if cfg.position != "relative" else None
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.emb_dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        item_seq: torch.Tensor,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Representations of prefixes.

        item_seq: (B, L) int64, left-aligned, 0 = padding, L <= max_len.
        rows, cols: (P,) int64 — which (sequence, column) outputs to return. Column c is the
        representation of the prefix item_seq[row, :c+1]. Default: each row's last real item.
        Returns (P, D). The last block computes only the selected rows.
        """
        if item_seq.dim() != 2:
            raise ValueError(f"item_seq must be (B, L), got shape {tuple(item_seq.shape)}")
        batch, length = item_seq.shape
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.cfg.max_len}")
        if rows is None or cols is None:
            lengths = (item_seq > 0).sum(dim=1)
            if bool((lengths == 0).any()):
                raise ValueError("every sequence needs at least one item")
            rows = torch.arange(batch, device=item_seq.device)
            cols = lengths - 1
        x = self.emb_dropout(self.emb_norm(self._embed(item_seq)))  # (B, L, D)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, (rows, cols))  # (P, D)

    def _embed(self, item_seq: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(item_seq)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(item_seq.shape[1], device=item_seq.device))
        return x

    def all_positions(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Every column's representation: (B, L, D). Padding columns hold garbage."""
        x = self.emb_dropout(self.emb_norm(self._embed(item_seq)))
        for block in self.blocks:
            x = block(x)
        return x

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Scores over real items: (P, D) -> (P, n_items); column j is item id j + 1."""
        return h @ self.item_emb.weight[1:].T


# ---------------------------------------------------------------- losses


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    tau: float,
    sim: str = "dot",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE between two views with in-batch negatives.

    z1, z2: (N, D); pair (i, i) is positive, every other of the 2N-2 vectors a negative.
    With ``labels`` (N,) (the targets), other samples that share a target are not used as
    negatives: they are positives under DuoRec's supervised view, and pushing them apart
    fights the objective.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)  # (2N, D)
    if sim == "cos":
        z = F.normalize(z, dim=-1)
    elif sim != "dot":
        raise ValueError(f"sim must be 'dot' or 'cos', got {sim!r}")
    logits = (z @ z.T) / tau  # (2N, 2N)
    idx = torch.arange(2 * n, device=z.device)
    partner = (idx + n) % (2 * n)
    drop = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if labels is not None:
        both = torch.cat([labels, labels])
        drop |= both[:, None] == both[None, :]
        drop[idx, partner] = False
    logits = logits.masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, partner)


CONTRASTIVE_MODES = ("none", "un", "su", "us", "us_x")


def duorec_loss(
    h: torch.Tensor,
    h_drop: torch.Tensor | None,
    h_sem: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    mode: str,
    tau: float,
    sim: str,
    lmd: float,
    lmd_sem: float,
    mask_false_negatives: bool,
) -> dict[str, torch.Tensor]:
    """DuoRec's contrastive terms (CE is computed by the caller).

    mode: "un" — h vs its dropout view (weight lmd); "su" — h vs a same-target sequence
    (weight lmd_sem); "us" — both; "us_x" — dropout view vs same-target view (weight
    lmd_sem), the variant of the DuoRec paper's released configs; "none" — SASRec.
    """
    labels = targets if mask_false_negatives else None
    out: dict[str, torch.Tensor] = {}
    if mode in ("un", "us"):
        assert h_drop is not None
        out["cl_unsup"] = lmd * info_nce(h, h_drop, tau, sim, labels)
    if mode in ("su", "us"):
        assert h_sem is not None
        out["cl_sup"] = lmd_sem * info_nce(h, h_sem, tau, sim, labels)
    if mode == "us_x":
        assert h_drop is not None and h_sem is not None
        out["cl_sup"] = lmd_sem * info_nce(h_drop, h_sem, tau, sim, labels)
    return out


def model_checksum(model: nn.Module) -> str:
    """A short content hash of the weights, used to tie artifacts to the model that made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
