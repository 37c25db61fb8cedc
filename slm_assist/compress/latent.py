"""Latent distillation terms (ERNIE-Tiny / TinyBERT style) for decoder LMs: which student layer learns from which
teacher layer, and the attention-distribution KL. The hidden-state loss and its projections are kd/latent.py's
(SALT's representation alignment uses them too).

Layers are indexed as in HF's `hidden_states`: 0 is the embedding output, i (1..L) the output of block i.
"""

from __future__ import annotations

import torch

from slm_assist.core.errors import UserError


def layer_map(n_student: int, n_teacher: int, explicit: list[int] | None = None, embeddings: bool = False,
              field: str = "layer_map") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs. Uniform by default: student block j learns from teacher block
    round(j·T/S), so the last block always maps to the last. `explicit` gives the teacher block of every student
    block (1-based); `embeddings` adds (0, 0)."""
    if explicit:
        if len(explicit) != n_student:
            raise UserError(f"{field}={explicit}: needs one teacher layer per student layer ({n_student} of them)")
        bad = [t for t in explicit if not 1 <= t <= n_teacher]
        if bad:
            raise UserError(f"{field}={explicit}: teacher layer {bad[0]} is outside 1..{n_teacher} (the teacher "
                            f"has {n_teacher} layers)")
        pairs = list(zip(range(1, n_student + 1), explicit))
    else:
        pairs = [(j, max(1, round(j * n_teacher / n_student))) for j in range(1, n_student + 1)]
    return ([(0, 0)] if embeddings else []) + pairs


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, field: str = "attention") -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions [B, H, T, T] (rows are queries), averaged over
    queries and heads. With fewer student heads, each student head learns the mean of a group of teacher heads."""
    hs, ht = student.shape[1], teacher.shape[1]
    if ht != hs:
        if ht % hs:
            raise UserError(f"{field}: the teacher's {ht} attention heads cannot be grouped onto the student's {hs}")
        teacher = teacher.unflatten(1, (hs, ht // hs)).mean(2)
    t = teacher.float()
    log_s = student.float().clamp_min(1e-30).log()  # causal rows have zeros: 0·log 0 = 0 by xlogy below
    return (torch.xlogy(t, t) - t * log_s).sum(-1).mean()
