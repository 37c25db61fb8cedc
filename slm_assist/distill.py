"""SALT distillation objective: (1 - w_t)·CE + w_t·KD(student, frozen SLM teacher; tau), with w_t from the
KD-weight schedule. Plugs into the trainer through the `Objective` interface (objectives.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slm_assist.config import check
from slm_assist.errors import UserError
from slm_assist.kd_schedule import KDScheduleConfig, kd_weight
from slm_assist.losses import kd_loss


@dataclass
class DistillConfig:
    teacher: str = ""
    """The SLM teacher: a save_pretrained directory with its tokenizer ("" = no distillation, plain CE)."""
    kind: Literal["forward_kl", "reverse_kl", "jsd", "nkd"] = "forward_kl"
    tau: float = 1.0
    """Softmax temperature of the KD term."""
    beta: float = 0.5
    """jsd only."""
    gamma: float = 1.5
    """nkd only: weight of the non-target term."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the KD loss (bounds its fp32 [chunk, vocab] memory); 0 = unchunked."""
    schedule: KDScheduleConfig = field(default_factory=KDScheduleConfig)

    def __post_init__(self) -> None:
        check(self.tau > 0, "tau", self.tau, "> 0")
        check(0 < self.beta < 1, "beta", self.beta, "in (0, 1)")
        check(self.chunk_tokens >= 0, "chunk_tokens", self.chunk_tokens, ">= 0 (0 = unchunked)")


def load_teacher(path: str, dataset_fingerprint: str, vocab: int, device: torch.device) -> torch.nn.Module:
    """Frozen teacher: eval mode, no grad, its own dtype; the data's tokenizer, and at least `vocab` (the real,
    unpadded vocabulary) output rows. Padded embedding sizes may differ from the student's."""
    from transformers import AutoModelForCausalLM

    from data_tools.tokenizer import load_tokenizer, tokenizer_fingerprint

    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"distill.teacher={path}: not a save_pretrained directory (no config.json)")
    if not (d / "tokenizer_config.json").is_file():
        raise UserError(f"distill.teacher={path}: no tokenizer next to the model; cannot check the vocabulary")
    fp = tokenizer_fingerprint(load_tokenizer(d))
    if fp != dataset_fingerprint:
        raise UserError(f"distill.teacher={path}: tokenizer fingerprint {fp} differs from the data's "
                        f"{dataset_fingerprint}; SALT needs the teacher and the student to share one vocabulary")
    teacher = AutoModelForCausalLM.from_pretrained(str(d)).to(device)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_t < vocab:
        raise UserError(f"distill.teacher={path}: {v_t} output rows < the tokenizer's {vocab} tokens")
    teacher.eval().requires_grad_(False)
    return teacher


class SALTObjective:
    """Loss for one micro-batch at step t; metrics: ce, kd (when w_t > 0), w_t, kd_phase."""

    def __init__(self, cfg: DistillConfig, teacher: torch.nn.Module, vocab: int, total_steps: int) -> None:
        self.cfg, self.teacher, self.vocab, self.total_steps = cfg, teacher, vocab, total_steps

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = kd_weight(step, self.total_steps, self.cfg.schedule)
        logits = model(input_ids=input_ids).logits[:, :-1]
        targets = input_ids[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        metrics = {"ce": ce.detach(), "w_t": torch.tensor(w, dtype=torch.float64),
                   "kd_phase": torch.tensor(float(w > 0))}
        if w == 0.0:
            return ce, metrics
        with torch.no_grad():
            # only the real vocabulary is compared: padded rows of either model are cut off
            t_logits = self.teacher(input_ids=input_ids).logits[:, :-1, : self.vocab]
        kd = kd_loss(logits, t_logits, kind=self.cfg.kind, tau=self.cfg.tau, beta=self.cfg.beta, gamma=self.cfg.gamma,
                     targets=targets, chunk=self.cfg.chunk_tokens)
        metrics["kd"] = kd.detach()
        return (1 - w) * ce + w * kd, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}  # the phase is a function of the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
