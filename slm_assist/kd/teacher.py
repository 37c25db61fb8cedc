"""The frozen teacher: loaded once, checked against the data's vocabulary before any step, never trained."""

from __future__ import annotations

from pathlib import Path

import torch

from slm_assist.core.dataset import PackedDataset
from slm_assist.core.model_dir import ModelDir


def load_teacher(path: str | Path, data: PackedDataset, device: torch.device, field: str,
                 dtype: torch.dtype | str = "auto", attn_implementation: str | None = None) -> torch.nn.Module:
    """Frozen teacher: eval mode, no grad, its own dtype unless `dtype` says; the data's tokenizer, and at least
    the real (unpadded) vocabulary's output rows. Padded embedding sizes may differ from the student's. `field` is
    the setting that named it, for the errors. `attn_implementation` None = transformers' default."""
    d = ModelDir.open(path, field)
    d.check_vocabulary(data, "distillation needs the teacher and the student to share one vocabulary")
    d.check_context(data.seq_len, "the teacher reads the student's sequences")
    # transformers' default attention (sdpa), as the teacher always had: "auto" would pick flash-attn on CUDA,
    # which does not run a teacher saved in fp32
    teacher = d.load(device, len(data.tokenizer), dtype=dtype, attn_implementation=attn_implementation)
    teacher.eval().requires_grad_(False)
    return teacher
