"""Hidden-state distillation shared by both recipes: the scale-free distance between a student's and a teacher's
states, and the learned projections that bring the student's width to the teacher's (compress's latent stages,
SALT's representation alignment)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["cosine", "mse"]) -> torch.Tensor:
    """Distance between states [..., d] of equal width (project first), free of the states' scale, which differs
    between layers and models. cosine: mean over tokens of 1 - cos (direction only). mse: mean squared error
    relative to the teacher states' mean square (direction and magnitude)."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


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
