"""The fine-tuning stage's evaluation: full-ranking metrics with and without retrieval, and
the fusion and neighbour diagnostics logged each epoch (``training/evaluate.py`` ranks)."""

from __future__ import annotations

import torch

from training.config import RunConfig
from training.evaluate import EvalResult, evaluate_scorer
from training.lifecycle import autocast
from training.ra.finetune.banks import KeyedBank, search_neighbours
from training.ra.finetune.diagnostics import RunningMean, neighbour_stats
from training.ra.finetune.model import RAModel


class Evaluator:
    """Scores the split's queries (one per user: its padded prefix and held-out target)."""

    def __init__(self, model: RAModel, eval_sets: dict, popularity, cfg: RunConfig, *, device: torch.device) -> None:
        self.model, self.eval_sets, self.popularity, self.device = model, eval_sets, popularity, device
        self.cfg, self.precision, self.k = cfg.eval, cfg.train.precision, cfg.ra.k

    @torch.no_grad()
    def evaluate(self, split: str, bank: KeyedBank | None) -> EvalResult:
        """Full-ranking metrics on ``split``; with a bank the fused scores, without it h's scores.

        The bank must already be clean for this split (``Banks.eval_bank`` checks it); no
        exclusion is applied at search time, so a leaky bank passed here shows its leak.
        """
        self.model.eval()
        prefixes, targets = self.eval_sets[split]

        def score(seq: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.precision):
                h = self.model.encoder(seq)
                if bank is None:
                    return self.model.encoder.scores(h)
                nb, _ = search_neighbours(self.model, bank, h, self.k)
                return self.model.fuse(h, nb).scores_fused

        return evaluate_scorer(score, prefixes, targets, ks=self.cfg.ks, item_popularity=self.popularity,
                               mask_seen=self.cfg.mask_seen, batch_size=self.cfg.batch_size,
                               device=self.device)

    @torch.no_grad()
    def diagnose(self, split: str, bank: KeyedBank) -> dict[str, float]:
        """Fusion and neighbour statistics over the split's users (one query each), eval mode:
        alpha/gate mean and std ACROSS users, ‖h‖/‖r‖, cos(h, fused), neighbour similarity,
        fraction of neighbours whose target is the user's true next item, fraction masked."""
        self.model.eval()
        prefixes, targets = self.eval_sets[split]
        alphas, means = [], RunningMean()
        for start in range(0, len(prefixes), self.cfg.batch_size):
            seq = torch.from_numpy(prefixes[start : start + self.cfg.batch_size]).to(self.device)
            with autocast(self.device, self.precision):
                h = self.model.encoder(seq)
                nb, res = search_neighbours(self.model, bank, h, self.k)
                out = self.model.fuse(h, nb)
            alphas.append(out.fusion.alpha.float().mean(dim=1).cpu())
            stats = {k: v.item() for k, v in out.fusion.stats.items() if k not in ("alpha_mean", "alpha_std")}
            stats.update(neighbour_stats(res, targets[start : start + len(seq)], out.retrieved.mask.cpu().numpy()))
            means.add(stats, len(seq))
        per_user = torch.cat(alphas)
        return {"alpha_mean": float(per_user.mean()), "alpha_std": float(per_user.std(unbiased=False)),
                **means.result()}
