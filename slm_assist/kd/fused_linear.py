"""SALT's CE + KD loss straight from hidden states and output-head weights, a chunk of tokens at a time, so neither
the student's nor the teacher's [N, V] logits ever exist: the fused-linear pattern of Liger-Kernel's distillation
losses, with what their API cannot express: SALT's per-token KD share, the top-k and confidence gates and the
z-loss.

Each chunk's student logits are recomputed from h·Wᵀ and their gradient is turned into the gradients of h and W
at once, in the forward pass (so the backward only scales them): peak memory is O(chunk × V) on top of the
hidden states and one fp32 copy of the head's gradient.
"""

from __future__ import annotations

import torch

from slm_assist.kd.losses import divergence
from slm_assist.kd.sources import token_gate


class _FusedLinearCEKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, t_h: torch.Tensor, t_w: torch.Tensor, y: torch.Tensor,
                weight: float, chunk: int, kd, gate_topk: int, gate_confidence: float, z_loss: float):
        n, v = h.shape[0], t_w.shape[0]
        w_real = w[:v]  # a padded student vocabulary: its extra rows get no logits and no gradient
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        aux = torch.empty(n, 4, dtype=torch.float32, device=h.device)  # ce, kd, log²Z, gate
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ys = y[s:e]
            t = (t_h[s:e] @ t_w.T).float()
            gate = None
            if gate_topk or gate_confidence:
                top = t.topk(max(1, gate_topk), dim=-1)
                gate = token_gate(top.indices, top.values - t.logsumexp(-1, keepdim=True), ys, gate_topk,
                                  gate_confidence)
            share = weight * (gate if gate is not None else torch.ones(e - s, device=h.device))
            with torch.enable_grad():
                x = (h[s:e] @ w_real.T).float().requires_grad_(True)
                log_z = x.logsumexp(-1)
                ce = log_z - x.gather(-1, ys[:, None]).squeeze(-1)
                kd_tok = kd(x, t, ys)
                loss = (1 - share) * ce + share * kd_tok + (z_loss * log_z.square() if z_loss else 0.0)
                (g,) = torch.autograd.grad(loss.sum(), x)
            grad_h[s:e] = g @ w_real.float()
            grad_w[:v] += g.T @ h[s:e].float()
            total += loss.detach().sum()
            aux[s:e] = torch.stack([ce.detach(), kd_tok.detach(), log_z.detach().square(),
                                    gate if gate is not None else torch.ones_like(ce)], -1)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.dtypes = n, (h.dtype, w.dtype)
        ctx.mark_non_differentiable(aux)
        return total / n, aux

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_aux: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return ((grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None, None, None)


def fused_linear_ce_kd(hidden: torch.Tensor, head: torch.Tensor, teacher_hidden: torch.Tensor,
                       teacher_head: torch.Tensor, targets: torch.Tensor, weight: float, *, kind: str = "forward_kl",
                       tau: float = 1.0, beta: float = 0.5, gamma: float = 1.5, chunk: int = 1024, gate_topk: int = 0,
                       gate_confidence: float = 0.0, z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over tokens of (1 - w·g)·CE + w·g·KD + z_loss·log²Z, with the logits of student and teacher computed
    chunk by chunk from `hidden` [N, H] @ `head` [V', H]ᵀ and `teacher_hidden` [N, Ht] @ `teacher_head` [V, Ht]ᵀ
    (V <= V': a padded student vocabulary). g is the token gate (top-k / confidence, from the teacher's chunk of
    logits; 1 without one). Returns the loss (gradients flow to `hidden` and `head`) and the detached parts to
    log, as `mixed_ce_kd` names them. Numerically the same as `mixed_ce_kd` on the materialised logits."""
    fn, scale = divergence(kind, tau, beta, gamma)

    def kd(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale * fn(x, t, y)

    n = targets.numel()
    t_hidden = teacher_hidden.reshape(n, -1).to(teacher_head.dtype)
    loss, aux = _FusedLinearCEKD.apply(hidden.reshape(n, -1), head, t_hidden, teacher_head, targets.reshape(n),
                                       float(weight), max(1, chunk), kd, gate_topk, gate_confidence, z_loss)
    gate = aux[:, 3]
    kept = gate.sum()
    parts = {"ce": aux[:, 0].mean(), "kd": (aux[:, 1] * gate).sum() / kept.clamp_min(1.0),
             "gate_frac": kept / n}
    return loss, {**parts, **({"z": aux[:, 2].mean()} if z_loss else {})}
