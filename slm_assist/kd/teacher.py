"""The frozen teacher: loaded once, checked against the data's vocabulary before any step, never trained."""

from __future__ import annotations

import torch

from slm_assist.core.dataset import PackedDataset
from slm_assist.core.model_dir import ModelDir


def load_teacher(path: str, data: PackedDataset, device: torch.device, field: str = "distill.teacher") -> torch.nn.Module:
    """Frozen teacher: eval mode, no grad, its own dtype; the data's tokenizer, and at least the real (unpadded)
    vocabulary's output rows. Padded embedding sizes may differ from the student's."""
    d = ModelDir.open(path, field)
    d.check_vocabulary(data, "distillation needs the teacher and the student to share one vocabulary")
    teacher = d.load(device, len(data.tokenizer))
    teacher.eval().requires_grad_(False)
    return teacher
