"""Soft-target sources: where the KD term's target distribution comes from, behind one small interface.

A source maps a micro-batch to `SoftTargets` (kd/losses.py), optionally with a token gate: KD only where the
target is among the source's top-k, CE elsewhere (soft labels add bias where the teacher is wrong). Recipes
combine a source with a weight schedule and `mixed_ce_kd`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slm_assist.core.errors import UserError
from slm_assist.core.scores import SoftLabelCache
from slm_assist.kd.losses import SoftTargets
from slm_assist.training.batches import Batch


class SoftTargetSource(Protocol):
    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        """Soft targets for the batch's positions 0..T-2 over the first `vocab` (real, unpadded) tokens."""


class OnlineTeacher:
    """A frozen teacher run on every micro-batch (kd/teacher.py loads one)."""

    def __init__(self, model: torch.nn.Module, gate_topk: int = 0) -> None:
        self.model, self.gate_topk = model, gate_topk

    @torch.no_grad()
    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        logits = self.model(input_ids=batch.input_ids).logits[:, :-1, :vocab]
        gate = None
        if self.gate_topk:
            kth = logits.topk(self.gate_topk, dim=-1).values[..., -1]
            gate = (logits.gather(-1, batch.targets().unsqueeze(-1)).squeeze(-1) >= kth).reshape(-1).float()
        return SoftTargets(logits=logits, gate=gate)


class CachedSoftLabels:
    """The SLM's top-k or sampled labels from a scoring run's cache, looked up by the batch's row indices: KD
    without running the teacher."""

    def __init__(self, cache: SoftLabelCache, gate_topk: int = 0, field: str = "gate_topk") -> None:
        if gate_topk and (cache.mode != "top_k" or gate_topk > cache.shape[1]):
            raise UserError(f"{field}={gate_topk} needs a top_k cache with k >= {gate_topk} "
                            f"(this one: {cache.mode}, width {cache.shape[1]})")
        self.cache, self.gate_topk = cache, gate_topk

    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        if batch.index is None:
            raise UserError("KD from a soft-label cache needs batches drawn from the cached split (row indices)")
        labels = {k: v.to(batch.input_ids.device) for k, v in self.cache.get(batch.index).items()}
        gate = None
        if self.gate_topk:  # the cache's ids are sorted by teacher probability
            gate = (labels["ids"][..., : self.gate_topk] == batch.targets().unsqueeze(-1)).any(-1).reshape(-1).float()
        return SoftTargets(sparse=labels, gate=gate)


class SmoothedOneHot:
    """No teacher: the one-hot target smoothed by `eps` (the label-smoothing control arm)."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        return SoftTargets(smoothing=self.eps)
