"""Sparse SLM soft labels, computed by `data_tools.score` in its forward pass. The cache format (its writer and
its reader, `SoftLabelCache`) lives in slm_assist/core/scores.py.

Two encodings per scored position (T-1 per sequence):
- `top_k`: the SLM's k most likely token ids (int32) and their log-probs (fp16), plus the leftover tail mass
  1 - sum(top-k probs) (fp32), so a KD loss can treat the tail as one bucket.
- `sampled`: n token ids drawn with replacement from the SLM's distribution and their log-probs (as in
  "Sparse Logit Sampling", arXiv 2503.16870). Each draw has weight 1/n, so sum_i w_i * 1[id_i = v] is an
  unbiased estimate of p(v): a KD loss built on it is unbiased in expectation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from slm_assist.core.config import check, check_no_effect


@dataclass
class CacheConfig:
    mode: Literal["none", "top_k", "sampled"] = "none"
    """none = no cache; top_k or sampled (see module doc)."""
    k: int = 32
    """top_k: tokens kept per position."""
    samples: int = 32
    """sampled: draws per position."""
    indices: str = ""
    """A selection index (index.npy from data_tools.select): cache only those sequences ("" = all)."""
    seed: int = 0
    """sampled: seeds the draws (per sequence, so shards do not change them)."""

    def __post_init__(self) -> None:
        check(self.k > 0, "k", self.k, "> 0")
        check(self.samples > 0, "samples", self.samples, "> 0")
        unused = {"none": ["k", "samples", "indices", "seed"], "top_k": ["samples", "seed"], "sampled": ["k"]}
        check_no_effect(self, unused[self.mode], f"with cache.mode={self.mode}")


def bytes_per_position(cfg: CacheConfig) -> int:
    if cfg.mode == "top_k":
        return cfg.k * (4 + 2) + 4
    if cfg.mode == "sampled":
        return cfg.samples * (4 + 2)
    return 0


def top_k_labels(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """[..., P, V] logits -> ids [..., P, k] int32, logprobs [..., P, k] fp16, tail [..., P] fp32, on the host.
    The top-k runs on the logits' own dtype (same order as fp32), so no full log-softmax is materialised, and on
    their device: only the [P, k] results are copied."""
    top, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    logp = top.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    tail = (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
    return {"ids": ids.int().cpu().numpy(), "logprobs": logp.half().cpu().numpy(), "tail": tail.cpu().numpy()}


def sampled_labels(logits: torch.Tensor, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    """[P, V] logits of one sequence -> n draws per position from softmax(logits): ids int32, log-probs fp16."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.multinomial(logp.exp(), n, replacement=True, generator=generator)
    return {"ids": ids.int().numpy(), "logprobs": logp.gather(-1, ids).half().numpy()}


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """Draws depend on (seed, sequence index) only, so sharding and batch size never change them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)
