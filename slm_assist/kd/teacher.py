"""The frozen teacher: loaded once, checked against the data's vocabulary before any step, never trained."""

from __future__ import annotations

from pathlib import Path

import torch

from slm_assist.core.dataset import PackedDataset
from slm_assist.core.model_dir import ModelDir


def teacher_dtype(train_dtype: str, device: torch.device) -> torch.dtype | str:
    """The one rule for a frozen teacher's dtype: bf16 when the run trains in bf16 on a GPU (half the weights'
    memory, twice the matmul rate); otherwise as it was saved ("auto"): on CPU bf16 matmuls are slower, not
    faster, and a run in fp32 wants its teacher's full precision."""
    return torch.bfloat16 if train_dtype == "bf16" and device.type == "cuda" else "auto"


def load_teacher(path: str | Path, data: PackedDataset, device: torch.device, field: str,
                 train_dtype: str = "fp32", attn_implementation: str | None = None) -> torch.nn.Module:
    """Frozen teacher: eval mode, no grad, in `teacher_dtype(train_dtype, device)`; the data's tokenizer, and at
    least the real (unpadded) vocabulary's output rows. Padded embedding sizes may differ from the student's.
    `field` is the setting that named it, for the errors. `attn_implementation` None = transformers' default."""
    d = ModelDir.open(path, field)
    d.check_vocabulary(data, "distillation needs the teacher and the student to share one vocabulary")
    d.check_context(data.seq_len, "the teacher reads the student's sequences")
    # transformers' default attention (sdpa), as the teacher always had: "auto" would pick flash-attn on CUDA,
    # which does not run a teacher saved in fp32
    teacher = d.load(device, len(data.tokenizer), dtype=teacher_dtype(train_dtype, device),
                     attn_implementation=attn_implementation)
    teacher.eval().requires_grad_(False)
    return teacher
