"""Per-token and per-sequence SLM statistics, as pure functions of logits (the math `data_tools.score` runs).

Position t of a sequence predicts token t+1, so a sequence of T tokens has T-1 scored positions.
"""

from __future__ import annotations

import torch

SCORE_COLUMNS = ("mean_loss", "median_loss", "salt_ds", "learnable_frac", "mean_entropy", "top1_acc")


def token_stats(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Token loss, entropy, "learnable" (target in the model's top-k) and top-1 correctness, all [B, P], in fp32.

    The target's rank is the number of logits strictly above it, so ties favour the target and no top-k sort over
    the vocabulary is needed.
    """
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1))
    rank = (logits > target_logit).sum(-1)
    return {
        "loss": -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "learnable": rank < k,
        "top1": rank == 0,
    }


def sequence_scores(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence scores [B] from token stats.

    salt_ds: the median loss over learnable tokens (SALT's "challenging yet learnable" score); NaN for a
    sequence with no learnable token, which selection never picks. Medians are the midpoint median.
    """
    loss, learnable = stats["loss"], stats["learnable"]
    return {
        "mean_loss": loss.mean(-1),
        "median_loss": torch.quantile(loss, 0.5, dim=-1),
        "salt_ds": torch.nanquantile(loss.masked_fill(~learnable, float("nan")), 0.5, dim=-1),
        "learnable_frac": learnable.float().mean(-1),
        "mean_entropy": stats["entropy"].mean(-1),
        "top1_acc": stats["top1"].float().mean(-1),
    }


def score_logits(logits: torch.Tensor, input_ids: torch.Tensor, k: int, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Scores for a batch from full logits [B, T, V], `chunk` sequences at a time so that only one chunk of
    fp32 vocabulary-sized intermediates exists at once."""
    out: dict[str, list[torch.Tensor]] = {c: [] for c in SCORE_COLUMNS}
    for s in range(0, logits.shape[0], chunk):
        stats = token_stats(logits[s : s + chunk, :-1], input_ids[s : s + chunk, 1:], k)
        for c, v in sequence_scores(stats).items():
            out[c].append(v)
    return {c: torch.cat(v) for c, v in out.items()}
