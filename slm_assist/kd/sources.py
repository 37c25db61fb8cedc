"""Soft-target sources: where the KD term's target distribution comes from, behind one small interface.

A source maps a micro-batch to `SoftTargets` (kd/losses.py), optionally with a token gate (KD only where it
helps, CE elsewhere: soft labels add bias where the teacher is wrong):
- top-k gating: KD only where the target is among the source's top-k;
- confidence gating: KD off where the source is confidently wrong (its top-1 is not the target, at p >= c).
Several teachers (or their caches) can form an ensemble: their distributions averaged (MEAL V2), or by a
committee vote (the teachers that agree with the majority's top-1 token, averaged). Recipes combine a source
with a weight schedule and `mixed_ce_kd`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Protocol

import torch

from slm_assist.core.errors import UserError
from slm_assist.core.soft_labels import SoftLabelCache, TopKLabels
from slm_assist.kd.losses import SoftTargets
from slm_assist.training.batches import Batch

Combine = Literal["mean", "vote"]
SOFT_LABELS = "soft_labels"  # the Batch.extras key of cached labels read with the batch (records, as stored)


class SoftTargetSource(Protocol):
    def attach(self, batch: Batch) -> Batch:
        """The host-side data the source needs with a batch (cached labels), read with it in the batch stream's
        prefetch thread; a source that reads nothing returns the batch as it is."""

    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        """Soft targets for the batch's positions 0..T-2 over the first `vocab` (real, unpadded) tokens."""


def member_weights(top1: torch.Tensor, conf: torch.Tensor, combine: Combine) -> torch.Tensor:
    """Per-token weights [m, ...] (summing to 1 over the m members) of an ensemble, from each member's top-1
    token and its probability. mean: 1/m each. vote: the members whose top-1 is the majority's, equally; a tie
    goes to the group with the larger summed confidence."""
    m = top1.shape[0]
    if combine == "mean" or m == 1:
        return torch.full(top1.shape, 1.0 / m, device=top1.device)
    agree = (top1.unsqueeze(0) == top1.unsqueeze(1)).float()  # [m, m, ...]: member j agrees with member i
    votes = agree.sum(1)
    support = (agree * conf.unsqueeze(0)).sum(1)  # summed confidence of i's group, < m
    winner = (votes + support / (m + 1)).argmax(0, keepdim=True)  # lexicographic: votes, then confidence
    chosen = agree.gather(1, winner.unsqueeze(1).expand(m, 1, *top1.shape[1:])).squeeze(1)
    return chosen / chosen.sum(0, keepdim=True)


def combine_logits(logits: list[torch.Tensor], combine: Combine) -> torch.Tensor:
    """One teacher's logits as they are; an ensemble's combined distribution as log-probabilities (fp32), built
    member by member (one [B, P, V] fp32 temporary besides the sum)."""
    if len(logits) == 1:
        return logits[0]
    top1 = torch.stack([x.argmax(-1) for x in logits])
    conf = torch.stack([(x.float().amax(-1) - x.float().logsumexp(-1)).exp() for x in logits])  # top-1 probability
    w = member_weights(top1, conf, combine)
    mix = sum(wi.unsqueeze(-1) * x.float().softmax(-1) for wi, x in zip(w, logits))
    return mix.clamp_min(1e-30).log()  # floored: a zero would make KL NaN


def merge_top_k(members: list[TopKLabels], weights: torch.Tensor) -> TopKLabels:
    """Sparse top-k labels of several teachers -> one top-k record of their weighted mixture, over the union of
    their ids (a token one teacher lists is counted once), sorted by probability. Each teacher's tail mass
    stays in the tail bucket: an approximation where it overlaps another teacher's top-k. Unused slots have
    logprob -inf (losses and gates skip them)."""
    ids = torch.cat([m.ids for m in members], -1)
    probs = torch.cat([w.unsqueeze(-1) * m.logprobs.float().exp() for m, w in zip(members, weights)], -1)
    ids, order = ids.sort(-1)
    probs = probs.gather(-1, order)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[..., 1:] = ids[..., 1:] != ids[..., :-1]
    slot = new.long().cumsum(-1) - 1  # the merged slot of each entry
    merged_p = torch.zeros_like(probs).scatter_add_(-1, slot, probs)
    merged_ids = torch.zeros_like(ids).scatter_(-1, slot, ids)
    merged_p, order = merged_p.sort(-1, descending=True)
    used = merged_p > 0  # empty slots, and the ids only a zero-weight (outvoted) member listed
    logprobs = torch.where(used, merged_p.clamp_min(1e-30).log(), torch.full_like(merged_p, float("-inf")))
    tail = sum(w * m.tail.float() for m, w in zip(members, weights))
    return TopKLabels(merged_ids.gather(-1, order), logprobs, tail)


def token_gate(top_ids: torch.Tensor, top_logprobs: torch.Tensor, targets: torch.Tensor, topk: int,
               confidence: float) -> torch.Tensor | None:
    """[B·P] 1.0 where KD applies, from the source's ids and logprobs sorted by probability ([B, P, >= k]):
    the target among the top-k (topk > 0), and not confidently wrong (confidence > 0). None = no gate."""
    gate = None
    if topk:
        gate = ((top_ids[..., :topk] == targets.unsqueeze(-1)) & (top_logprobs[..., :topk] > float("-inf"))).any(-1)
    if confidence:
        wrong = (top_ids[..., 0] != targets) & (top_logprobs[..., 0].exp() >= confidence)
        gate = ~wrong if gate is None else gate & ~wrong
    return None if gate is None else gate.reshape(-1).float()


class OnlineTeacher:
    """Frozen teachers (kd/teacher.py loads them) run on every micro-batch: one, or an ensemble."""

    def __init__(self, models: torch.nn.Module | list[torch.nn.Module], gate_topk: int = 0,
                 gate_confidence: float = 0.0, combine: Combine = "mean") -> None:
        self.models = models if isinstance(models, list) else [models]
        self.gate_topk, self.gate_confidence, self.combine = gate_topk, gate_confidence, combine

    @torch.no_grad()
    def attach(self, batch: Batch) -> Batch:
        return batch  # nothing to read on the host

    def __call__(self, batch: Batch, vocab: int, hidden: bool = False) -> SoftTargets:
        """`hidden`: also the (one) teacher's last hidden state, from the same forward."""
        outs = [m(input_ids=batch.input_ids, output_hidden_states=hidden) for m in self.models]
        logits = combine_logits([o.logits[:, :-1, :vocab] for o in outs], self.combine)
        gate = None
        if self.gate_topk or self.gate_confidence:
            top = logits.topk(max(1, self.gate_topk), dim=-1)
            logprobs = top.values.float() - logits.float().logsumexp(-1, keepdim=True)
            gate = token_gate(top.indices, logprobs, batch.targets(), self.gate_topk, self.gate_confidence)
        return SoftTargets(logits=logits, gate=gate, hidden=outs[0].hidden_states[-1] if hidden else None)


class CachedSoftLabels:
    """The SLM's top-k or sampled labels from a scoring run's cache (or several SLMs' top-k caches, combined),
    looked up by the batch's row indices: KD without running the teacher."""

    def __init__(self, caches: SoftLabelCache | list[SoftLabelCache], gate_topk: int = 0, field: str = "gate_topk",
                 gate_confidence: float = 0.0, combine: Combine = "mean") -> None:
        self.caches = caches if isinstance(caches, list) else [caches]
        for c in self.caches:
            if gate_topk and (c.record is not TopKLabels or gate_topk > c.shape[1]):
                raise UserError(f"{field}={gate_topk} needs a top_k cache with k >= {gate_topk} "
                                f"({c.path}: {c.mode}, width {c.shape[1]})")
            if (gate_confidence or len(self.caches) > 1) and c.record is not TopKLabels:
                what = "distill.gate.confidence" if gate_confidence else "an ensemble of caches"
                raise UserError(f"{what} needs top_k caches (their top-1 and probabilities); {c.path} is {c.mode}")
        self.gate_topk, self.gate_confidence, self.combine = gate_topk, gate_confidence, combine

    def attach(self, batch: Batch) -> Batch:
        """The host side of the lookup, for `ShardedBatches.attach`: each member's labels read with the batch (in a
        prefetching stream, off the training thread), in their stored dtypes, to be copied with it."""
        if batch.index is None:
            raise UserError("KD from a soft-label cache needs batches drawn from the cached split (row indices)")
        return replace(batch, extras={**batch.extras, SOFT_LABELS: [c.read(batch.index) for c in self.caches]})

    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        if SOFT_LABELS not in batch.extras:  # not attached by the stream: read now
            batch = self.attach(batch).to(batch.input_ids.device)
        members = [m.widen() for m in batch.extras[SOFT_LABELS]]  # upcast on the device
        labels = members[0]
        if len(members) > 1:
            top1 = torch.stack([m.ids[..., 0] for m in members])
            conf = torch.stack([m.logprobs[..., 0].float().exp() for m in members])
            labels = merge_top_k(members, member_weights(top1, conf, self.combine))
        gate = token_gate(labels.ids, labels.logprobs, batch.targets(), self.gate_topk, self.gate_confidence)
        return SoftTargets(sparse=labels, gate=gate)


class SmoothedOneHot:
    """No teacher: the one-hot target smoothed by `eps` (the label-smoothing control arm)."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def attach(self, batch: Batch) -> Batch:
        return batch  # nothing to read on the host

    def __call__(self, batch: Batch, vocab: int) -> SoftTargets:
        return SoftTargets(smoothing=self.eps)
