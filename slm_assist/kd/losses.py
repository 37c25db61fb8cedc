"""Distillation losses: pure functions of tensors, computed in fp32, in chunks of tokens.

Full-vocabulary probabilities are never materialised for more than one chunk per model. The forward pass
computes per-token losses chunk by chunk without a graph; the backward pass recomputes each chunk with grad
enabled and writes that chunk's gradient, so autograd never holds more than one chunk of [chunk, V] fp32
intermediates (the usual OOM spot for KD at 32k+ vocabularies). fp32 matters: a bf16 reduction can make KL
negative.

The per-token functions return [n] losses; `kd_loss` applies the temperature and Hinton's tau^2 factor (so the
gradient scale does not shrink with the temperature).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from slm_assist.core.config import check, check_no_effect
from slm_assist.core.soft_labels import SampledLabels, SoftLabels, TopKLabels

TokenLossFn = Callable[..., torch.Tensor]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "nkd"]


@dataclass
class KDLossConfig:
    """How a KD term is computed, shared by every recipe's KD loss (SALT's distill.loss, a compress stage's
    loss)."""

    kind: Divergence = "forward_kl"
    """The divergence: forward KL (SALT's), reverse KL, JSD(beta), or NKD (normalised KD, arXiv 2303.13005)."""
    tau: float = 1.0
    """Softmax temperature of the KD term (Hinton's tau^2 factor keeps the gradient scale)."""
    beta: float = 0.5
    """jsd only: the mixture weight, in (0, 1)."""
    gamma: float = 1.5
    """nkd only: weight of the non-target term."""
    chunk_tokens: int = -1
    """Tokens per chunk of the fused CE+KD loss, which bounds its fp32 [chunk, vocab] temporaries. -1 = auto:
    16 MiB per temporary on CPU (131 tokens at vocab 32k; measured 0.83x the CE-only loss peak at seq 2048,
    against 1.55x at 1024-token chunks, bench/kd_overhead.py), 64 MiB on a GPU. 0 = unchunked."""
    fused_linear: bool = False
    """The loss straight from the hidden states of student and teacher, a chunk of tokens at a time
    (kd/fused_linear.py): neither model's full logits exist, which saves most of the loss memory at a 32k+
    vocabulary. One online teacher, ZeRO 0-2, models whose logits are head(hidden)."""

    def __post_init__(self) -> None:
        check(self.tau > 0, "tau", self.tau, "> 0")
        check(0 < self.beta < 1, "beta", self.beta, "in (0, 1)")
        check(self.chunk_tokens >= -1, "chunk_tokens", self.chunk_tokens, "-1 (auto), 0 (unchunked) or > 0")
        check_no_effect(self, [n for n, kind in (("beta", "jsd"), ("gamma", "nkd")) if self.kind != kind],
                        f"with kind={self.kind}")

    def terms(self) -> dict[str, object]:
        """The divergence's own settings, as the loss functions take them."""
        return {"kind": self.kind, "tau": self.tau, "beta": self.beta, "gamma": self.gamma}


def chunk_tokens(setting: int, vocab: int, cuda: bool = False) -> int:
    """Tokens per loss chunk from a `chunk_tokens` setting: 0 = unchunked, > 0 = the setting, -1 (auto) = the
    fp32 [chunk, vocab] temporaries' budget: 16 MiB on CPU (131 tokens at vocab 32k: they stay in cache), 64 MiB
    on a GPU (524 tokens at 32k: fewer, larger kernels; a GPU is launch-bound at CPU-sized chunks)."""
    return setting if setting >= 0 else max(1, ((64 if cuda else 16) << 20) // (4 * vocab))


class _ChunkedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: TokenLossFn, chunk: int, student: torch.Tensor, *extras: torch.Tensor):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(student, *extras)
        out = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        aux = None
        for s in range(0, student.shape[0], chunk):
            res = fn(student[s : s + chunk].float(), *(e[s : s + chunk] for e in extras))
            loss, extra = res if isinstance(res, tuple) else (res, res)
            if aux is None:
                aux = torch.empty((student.shape[0], *extra.shape[1:]), dtype=torch.float32, device=student.device)
            out[s : s + chunk], aux[s : s + chunk] = loss, extra
        ctx.mark_non_differentiable(aux)
        return out, aux

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_aux: torch.Tensor):
        student, *extras = ctx.saved_tensors
        grad = torch.empty_like(student)
        for s in range(0, student.shape[0], ctx.chunk):
            with torch.enable_grad():
                piece = student[s : s + ctx.chunk].detach().float().requires_grad_(True)
                res = ctx.fn(piece, *(e[s : s + ctx.chunk] for e in extras))
                loss = res[0] if isinstance(res, tuple) else res
                (g,) = torch.autograd.grad(loss, piece, grad_out[s : s + ctx.chunk])
            grad[s : s + ctx.chunk] = g.to(grad.dtype)
        return (None, None, grad, *([None] * len(extras)))


def chunked_token_loss(fn: TokenLossFn, student: torch.Tensor, *extras: torch.Tensor, chunk: int = 1024,
                       with_aux: bool = False):
    """Per-token losses [n] of `fn(student_chunk_fp32, *extra_chunks)` over rows of `student` [n, V], chunked.
    Gradients flow to `student` only (the extras are teacher-side and constant). With `with_aux`, `fn` returns
    (loss [n], aux [n, ...]) and both come back; `aux` (values to log) carries no gradient."""
    if chunk <= 0:
        res = fn(student.float(), *extras)
        loss, aux = res if isinstance(res, tuple) else (res, res)
        return (loss, aux.detach()) if with_aux else loss
    loss, aux = _ChunkedTokenLoss.apply(fn, chunk, student, *extras)
    return (loss, aux) if with_aux else loss


# ---- per-token divergences (inputs: student logits / tau in fp32; teacher side as noted) --------------------

def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student); `t` = teacher logits / tau."""
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t.float(), -1), log_target=True, reduction="none").sum(-1)


def reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(p_student || p_teacher)."""
    return F.kl_div(F.log_softmax(t.float(), -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)


def jsd(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: beta·KL(p_t || m) + (1-beta)·KL(p_s || m), m = beta·p_t + (1-beta)·p_s."""
    logp_s, logp_t = F.log_softmax(s, -1), F.log_softmax(t.float(), -1)
    log_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1 - beta)]), dim=0)
    kl_t = F.kl_div(log_m, logp_t, log_target=True, reduction="none").sum(-1)
    kl_s = F.kl_div(log_m, logp_s, log_target=True, reduction="none").sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def nkd(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, tau: float = 1.0, gamma: float = 1.5) -> torch.Tensor:
    """Normalized KD (Yang et al., arXiv 2303.13005), per token, from *untempered* logits:
        -p_t(y) · log p_s(y)  +  gamma · tau^2 · KL(q_t || q_s)
    where q are the teacher's and student's distributions over the non-target tokens, renormalised at tau.
    (The paper writes the second term as a cross-entropy; the KL differs by the teacher's entropy, a constant.)
    """
    y = target.unsqueeze(-1)
    target_term = -(F.softmax(t.float(), -1).gather(-1, y) * F.log_softmax(s, -1).gather(-1, y)).squeeze(-1)
    neg = torch.finfo(torch.float32).min
    q_s = F.log_softmax((s / tau).scatter(-1, y, neg), -1)
    q_t = F.log_softmax((t.float() / tau).scatter(-1, y, neg), -1)
    non_target = F.kl_div(q_s, q_t, log_target=True, reduction="none").scatter(-1, y, 0.0).sum(-1)
    return target_term + gamma * tau**2 * non_target


def top_k_kl(s: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Forward KL against a top-k teacher (cache): the k tokens plus one tail bucket holding the leftover mass
    (student side: 1 - the student's mass on the k tokens). With k = vocabulary it equals `forward_kl`. Slots
    with logprob -inf (unused slots of a merged ensemble record) count for neither side."""
    logp_s = F.log_softmax(s, -1)
    lp_s_k = logp_s.gather(-1, ids)
    lp_t_k = logprobs.float()
    used = lp_t_k > float("-inf")
    head = torch.where(used, lp_t_k.exp() * (lp_t_k - lp_s_k), 0.0).sum(-1)
    tail = tail.float()
    s_tail = (1 - torch.where(used, lp_s_k.exp(), 0.0).sum(-1)).clamp_min(1e-12)
    tail_term = torch.where(tail > 0, tail * (torch.log(tail.clamp_min(1e-12)) - torch.log(s_tail)), torch.zeros_like(tail))
    return head + tail_term


def sampled_kl(s: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of KL(p_t || p_s) from draws x_j ~ p_t with weights w_j (sum 1):
    sum_j w_j · (log p_t(x_j) - log p_s(x_j)). Its expectation over the draws is the forward KL."""
    logp_s = F.log_softmax(s, -1).gather(-1, ids)
    return (weights.float() * (logprobs.float() - logp_s)).sum(-1)


# ---- the teacher side: an online teacher's logits or cached sparse labels ---------------------------------------

def _kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, cache: SoftLabels | None,
             kind: str, tau: float, beta: float, gamma: float) -> tuple[torch.Tensor, Callable, tuple, float]:
    """(student rows [n, V'], fn(student_fp32, targets, *teacher_side) -> per-token KD [n], teacher side as
    [n, ...] tensors, scale) for either teacher. A padded student vocabulary is cut to the teacher's V'."""
    if cache is not None:
        if tau != 1.0:
            raise ValueError(f"cached soft labels are at temperature 1; got tau={tau}")
        n = student_logits.numel() // student_logits.shape[-1]
        div, side = _cache_divergence(cache, n)
        return student_logits.reshape(n, -1), (lambda x, y, *t: div(x, *t)), side, 1.0
    if teacher_logits is None:
        raise ValueError("KD needs teacher_logits or a cache")
    v = teacher_logits.shape[-1]
    fn, scale = divergence(kind, tau, beta, gamma)
    return student_logits[..., :v].reshape(-1, v), (lambda x, y, t: fn(x, t, y)), (teacher_logits.reshape(-1, v),), scale


def _cache_divergence(cache: SoftLabels, n: int) -> tuple[Callable, tuple[torch.Tensor, ...]]:
    """(divergence fn, its per-token teacher-side tensors as [n, ...]) for cached top-k or sampled labels."""
    if isinstance(cache, TopKLabels):
        return top_k_kl, (cache.ids.reshape(n, -1), cache.logprobs.reshape(n, -1), cache.tail.reshape(n))
    if isinstance(cache, SampledLabels):
        return sampled_kl, (cache.ids.reshape(n, -1), cache.logprobs.reshape(n, -1), cache.weights.reshape(n, -1))
    raise TypeError(f"cached soft labels must be TopKLabels or SampledLabels, got {type(cache).__name__}")


def divergence(kind: str, tau: float, beta: float, gamma: float) -> tuple[Callable, float]:
    """(fn(student_fp32, teacher_side..., targets) -> [n], scale) for an online-teacher KD kind."""
    if kind == "forward_kl":
        return (lambda a, b, y: forward_kl(a / tau, b / tau)), tau**2
    if kind == "reverse_kl":
        return (lambda a, b, y: reverse_kl(a / tau, b / tau)), tau**2
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
        return (lambda a, b, y: jsd(a / tau, b / tau, beta)), tau**2
    if kind == "nkd":
        return (lambda a, b, y: nkd(a, b, y, tau=tau, gamma=gamma)), 1.0
    raise ValueError(f"unknown KD kind {kind!r}: forward_kl, reverse_kl, jsd, nkd")


# ---- the losses the objectives call --------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, *, kind: str = "forward_kl",
            tau: float = 1.0, beta: float = 0.5, gamma: float = 1.5, targets: torch.Tensor | None = None,
            cache: SoftLabels | None = None, token_weights: torch.Tensor | None = None,
            chunk: int = 1024) -> torch.Tensor:
    """Mean distillation loss over tokens (weighted by `token_weights` when given), times tau^2.

    student_logits: [..., V]; teacher_logits: [..., V'] with V' <= V (a padded student vocabulary is cut to the
    teacher's). `cache` (a widened `TopKLabels` or `SampledLabels` record, as `SoftLabelCache.get` returns it,
    positions aligned with the student's) replaces the teacher for kind="top_k" or "sampled"; its record type
    picks the divergence. Cached labels are at temperature 1, so tau must be 1 there.
    """
    cached = kind in ("top_k", "sampled")
    if cached and (cache is None or tau != 1.0):
        raise ValueError(f"kind={kind} needs cache= and tau=1 (cached labels are at temperature 1); got tau={tau}")
    if kind == "nkd" and targets is None:
        raise ValueError("kind=nkd needs targets")
    s, fn, side, scale = _kd_term(student_logits, None if cached else teacher_logits, cache if cached else None,
                                  kind, tau, beta, gamma)
    n = s.shape[0]
    y = targets.reshape(n) if targets is not None else torch.zeros(n, dtype=torch.long, device=s.device)
    per_tok = chunked_token_loss(fn, s, y, *side, chunk=chunk)
    if token_weights is None:
        return per_tok.mean() * scale
    w = token_weights.reshape(n).float()
    return (per_tok * w).sum() / w.sum().clamp_min(1e-12) * scale


def ce_plus_kd(student_logits: torch.Tensor, targets: torch.Tensor, kd_share: torch.Tensor, *,
               teacher_logits: torch.Tensor | None = None, cache: SoftLabels | None = None,
               kind: str = "forward_kl", tau: float = 1.0, beta: float = 0.5, gamma: float = 1.5,
               chunk: int = 1024, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SALT's loss in one chunked pass: mean over tokens of (1 - a_i)·CE_i + a_i·KD_i + z_loss·log²Z_i, with
    a_i = `kd_share` (w_t, times a token gate) and Z_i the student's softmax normaliser. Returns (loss, per-token
    CE [n], per-token KD [n], per-token log²Z [n]); the last three carry no gradient (they are for logging).

    Fusing CE into the same chunks keeps a single vocabulary-sized gradient buffer and no full log-softmax:
    peak loss memory is ~1.08x CE alone at vocab 32k, seq 2048 (bench/kd_overhead.py), against ~2x when CE
    and a chunked KD are separate terms.
    """
    s, fn_kd, side, scale = _kd_term(student_logits, teacher_logits, cache, kind, tau, beta, gamma)
    n = s.shape[0]
    y, a = targets.reshape(n), kd_share.reshape(n).float()

    def fn(x: torch.Tensor, share: torch.Tensor, y_: torch.Tensor, *teacher_side: torch.Tensor):
        kd = scale * fn_kd(x, y_, *teacher_side)
        log_z = torch.logsumexp(x, -1)
        ce = log_z - x.gather(-1, y_.unsqueeze(-1)).squeeze(-1)
        z2 = log_z.square()
        loss = (1 - share) * ce + share * kd + (z_loss * z2 if z_loss else 0.0)
        return loss, torch.stack([ce.detach(), kd.detach(), z2.detach()], -1)

    per_tok, aux = chunked_token_loss(fn, s, a, y, *side, chunk=chunk, with_aux=True)
    return per_tok.mean(), aux[:, 0], aux[:, 1], aux[:, 2]


@dataclass
class SoftTargets:
    """The KD term's target for one micro-batch, positions aligned with the student's logits [B, P]: exactly one
    of an online teacher's `logits`, `sparse` cached labels, or a one-hot `smoothing`."""

    logits: torch.Tensor | None = None
    """[B, P, V] teacher logits (V may be below a padded student vocabulary)."""
    sparse: SoftLabels | None = None
    """Cached labels, a `TopKLabels` or `SampledLabels` record widened to the loss's dtypes (`SoftLabelCache.get`)."""
    smoothing: float = 0.0
    """> 0: the one-hot target smoothed by this epsilon (the label-smoothing control)."""
    gate: torch.Tensor | None = None
    """[B·P] 1.0 where the KD term applies, 0.0 where the token is CE only (token gating); None = every token."""
    hidden: torch.Tensor | None = None
    """[B, T, d] the online teacher's last hidden state (every position), when asked for (representation alignment)."""


def mixed_ce_kd(student_logits: torch.Tensor, targets: torch.Tensor, weight: float, soft: SoftTargets, *,
                kind: str = "forward_kl", tau: float = 1.0, beta: float = 0.5, gamma: float = 1.5,
                chunk: int = 1024, z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over tokens of (1 - w·g)·CE + w·g·KD(soft targets || student) + z_loss·log²Z with the gate g (1
    without one), and its detached parts to log: `ce`, `kd` (over the gated tokens), `gate_frac`, and `z` (the
    mean log²Z) when z_loss > 0."""
    if soft.smoothing:
        # (1-w)·CE + w·CE(one-hot smoothed by eps) = CE with smoothing w·eps, up to a constant (the target's
        # entropy): one exact torch call instead of a second term.
        flat, tgt = student_logits.reshape(-1, student_logits.shape[-1]).float(), targets.reshape(-1)
        loss = F.cross_entropy(flat, tgt, label_smoothing=weight * soft.smoothing)
        parts = {}
        if z_loss:
            z2 = flat.logsumexp(-1).square().mean()
            loss, parts = loss + z_loss * z2, {"z": z2.detach()}
        with torch.no_grad():
            ce = F.cross_entropy(flat, tgt)
            kd = F.cross_entropy(flat, tgt, label_smoothing=soft.smoothing)
        return loss, {"ce": ce, "kd": kd, **parts}
    gate = soft.gate if soft.gate is not None else torch.ones(targets.numel(), device=student_logits.device)
    loss, ce_tok, kd_tok, z_tok = ce_plus_kd(student_logits, targets, weight * gate, teacher_logits=soft.logits,
                                             cache=soft.sparse, kind=kind, tau=tau, beta=beta, gamma=gamma,
                                             chunk=chunk, z_loss=z_loss)
    kept = gate.sum()
    parts = {"ce": ce_tok.mean(), "kd": (kd_tok * gate).sum() / kept.clamp_min(1.0), "gate_frac": kept / gate.numel()}
    return loss, {**parts, **({"z": z_tok.mean()} if z_loss else {})}
