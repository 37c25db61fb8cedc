"""Latent distillation terms (ERNIE-Tiny / TinyBERT style) for decoder LMs: which student layer learns from which
teacher layer, the hidden-state loss through a learned projection, and the attention-distribution KL.

Layers are indexed as in HF's `hidden_states`: 0 is the embedding output, i (1..L) the output of block i.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

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


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["cosine", "mse"]) -> torch.Tensor:
    """Distance between states [..., d] of equal width (project first), free of the states' scale, which differs
    between layers and models. cosine: mean over tokens of 1 - cos (direction only). mse: mean squared error
    relative to the teacher states' mean square (direction and magnitude)."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


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


class Projections(torch.nn.Module):
    """One learned linear map per mapped student layer, student width -> teacher width (none when they match).
    The Trainer trains, checkpoints and all-reduces it as an objective head; it is never exported."""

    def __init__(self, pairs: list[tuple[int, int]], d_student: int, d_teacher: int,
                 kept: list[int] | None = None) -> None:
        """`kept`: the teacher channel each student channel was pruned from; the maps then start as that selection
        (the student's states placed where they came from), so the loss starts from where the student is instead
        of from a random map whose gradients scramble the body."""
        super().__init__()
        self.identity = d_student == d_teacher
        self.maps = torch.nn.ModuleDict() if self.identity else torch.nn.ModuleDict(
            {str(s): torch.nn.Linear(d_student, d_teacher, bias=False) for s, _ in pairs})
        if kept is not None and not self.identity:
            if len(kept) != d_student or not all(0 <= c < d_teacher for c in kept):
                raise ValueError(f"kept channels {kept[:4]}...: need {d_student} teacher channels in 0..{d_teacher - 1}")
            with torch.no_grad():
                for proj in self.maps.values():
                    proj.weight.zero_()
                    proj.weight[torch.tensor(kept), torch.arange(d_student)] = 1.0

    def forward(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return states
        proj = self.maps[str(layer)]
        return proj(states.to(proj.weight.dtype))
