"""Sparse SLM soft labels, computed by `data_tools.score` in its forward pass: `top_k_labels` and
`sampled_labels` turn logits into the typed host records of slm_assist/core/soft_labels.py (`TopKLabels`,
`SampledLabels`), which also owns their dtypes, their size and the cache's format (`write_cache`,
`SoftLabelCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slm_assist.core.config import check, check_no_effect
from slm_assist.core.soft_labels import RECORDS, SampledLabels, TopKLabels


@dataclass
class CacheConfig:
    mode: Literal["none", "top_k", "sampled"] = "none"
    """none = no cache; top_k or sampled (`TopKLabels`, `SampledLabels`: see slm_assist/core/soft_labels.py)."""
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
    """Stored bytes of the cache per scored position (0 without a cache)."""
    if cfg.mode == "none":
        return 0
    return RECORDS[cfg.mode].bytes_per_position(cfg.k if cfg.mode == "top_k" else cfg.samples)


def top_k_labels(logits: torch.Tensor, k: int) -> TopKLabels:
    """[..., P, V] logits -> their top-k record ([..., P, k], the tail [..., P]) on the host, in the stored dtypes.
    The top-k runs on the logits' own dtype (same order as fp32), so no full log-softmax is materialised, and on
    their device: only the [P, k] results are copied."""
    top, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    logp = top.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    tail = (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
    return TopKLabels(ids, logp, tail).stored().to("cpu")


def sampled_labels(logits: torch.Tensor, n: int, generator: torch.Generator) -> SampledLabels:
    """[P, V] logits of one sequence (on the host) -> n draws per position from softmax(logits), as a record
    [P, n] in the stored dtypes."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.multinomial(logp.exp(), n, replacement=True, generator=generator)
    return SampledLabels(ids, logp.gather(-1, ids)).stored()


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """Draws depend on (seed, sequence index) only, so sharding and batch size never change them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)
