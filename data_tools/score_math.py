"""Per-token and per-sequence SLM statistics, as pure functions of logits (the math `data_tools.score` runs).

Position t of a sequence predicts token t+1, so a sequence of T tokens has T-1 scored positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCORE_COLUMNS = ("mean_loss", "median_loss", "salt_ds", "learnable_frac", "mean_entropy", "top1_acc",
                 "confident_wrong")
DEFAULT_CONFIDENT = 0.5  # the top-1 probability from which a wrong prediction counts as confident


def token_stats(logits: torch.Tensor, targets: torch.Tensor, k: int,
                confident: float = DEFAULT_CONFIDENT) -> dict[str, torch.Tensor]:
    """Token loss, entropy, "learnable" (target among the model's top-k), top-1 correctness and "confident_wrong",
    all [B, P].

    Only reductions over the vocabulary (max, a count, two sums) and no sort, so that `torch.compile` fuses them
    into a couple of reads of each logits chunk on a GPU, and no full log-softmax tensor exists. With
    z' = z - max(z) and S = sum(exp z'):
        loss = log S - z'_y,   entropy = log S - sum(exp(z') * z') / S.
    The target's rank is the number of logits strictly above z_y (in fp32, exact for bf16 logits): it is learnable
    iff rank < k (z_y >= the k-th largest logit) and top-1 iff rank = 0. On CPU, eager, this measured 0.65-0.98x
    the time of the former top-k version (bench/RESULTS.md).
    confident_wrong (Confident Learning, Northcutt et al. 2021): the top-1 probability, exp(0) / S = 1 / S, is at
    least `confident` (S <= 1 / confident, no extra pass) and the target is not a top-1 token.
    """
    z_y = logits.gather(-1, targets.unsqueeze(-1)).float()
    x = logits.float()  # a copy for bf16 logits, which the subtraction below may then overwrite
    rank = (x > z_y).sum(-1, dtype=torch.int32)  # int32: the default int64 sum of bools is 6x slower on CPU
    top = x.amax(-1, keepdim=True)
    # in place only on the bf16 copy: the caller's fp32 logits are read again (soft-label cache)
    shifted = x - top if logits.dtype == torch.float32 else x.sub_(top)
    e = shifted.exp()
    s = e.sum(-1)
    log_s = s.log()
    return {
        "loss": log_s - (z_y - top).squeeze(-1),
        "entropy": log_s - torch.linalg.vecdot(e, shifted) / s,
        "learnable": rank < k,
        "top1": rank == 0,
        "confident_wrong": (s <= 1.0 / confident) & (rank > 0),
    }


def sequence_scores(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence scores [B] from token stats.

    salt_ds: the median loss over learnable tokens (SALT's "challenging yet learnable" score); NaN for a
    sequence with no learnable token, which selection never picks. Medians are the midpoint median.
    confident_wrong: the share of positions where the SLM is confident and wrong (likely label noise).
    """
    loss, learnable = stats["loss"], stats["learnable"]
    return {
        "mean_loss": loss.mean(-1),
        "median_loss": torch.quantile(loss, 0.5, dim=-1),
        "salt_ds": torch.nanquantile(loss.masked_fill(~learnable, float("nan")), 0.5, dim=-1),
        "learnable_frac": learnable.float().mean(-1),
        "mean_entropy": stats["entropy"].mean(-1),
        "top1_acc": stats["top1"].float().mean(-1),
        "confident_wrong": stats["confident_wrong"].float().mean(-1),
    }


def compiled_token_stats() -> Callable[..., dict[str, torch.Tensor]]:
    """`token_stats` compiled whole (fullgraph: a graph break would split the fused reductions). Shapes are
    static at first, so the vocabulary stays a constant the reductions are tuned for; a shard's last, shorter
    chunk recompiles once with a dynamic batch dimension."""
    return torch.compile(token_stats, fullgraph=True)


def score_logits(logits: torch.Tensor, input_ids: torch.Tensor, k: int, chunk_bytes: int | None = None,
                 confident: float = DEFAULT_CONFIDENT,
                 stats: Callable[..., dict[str, torch.Tensor]] = token_stats) -> dict[str, torch.Tensor]:
    """Scores for a batch from full logits [B, T, V], a chunk of sequences at a time.

    Chunks hold at most `chunk_bytes` of fp32 vocabulary-sized intermediates (at least one sequence). Default:
    one sequence on CPU, where its intermediates then stay in cache (measured 4-5x faster than whole-batch
    tensors), and 1 GiB on CUDA, where per-sequence chunks would make the loop kernel-launch bound.
    """
    per_seq = (logits.shape[1] - 1) * logits.shape[2] * 4
    if chunk_bytes is None:
        chunk_bytes = (1 << 30) if logits.is_cuda else per_seq
    chunk = max(1, chunk_bytes // max(per_seq, 1))
    out: dict[str, list[torch.Tensor]] = {c: [] for c in SCORE_COLUMNS}
    for s in range(0, logits.shape[0], chunk):
        per_token = stats(logits[s : s + chunk, :-1], input_ids[s : s + chunk, 1:], k, confident)
        for c, v in sequence_scores(per_token).items():
            out[c].append(v)
    return {c: torch.cat(v) for c, v in out.items()}
