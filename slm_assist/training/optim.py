"""Optimizer and learning-rate schedule settings, and the schedule as a pure function of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from slm_assist.core.config import check


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global grad-norm clip; 0 = off."""
    impl: Literal["auto", "deepspeed_fused", "torch_fused", "torch"] = "auto"
    """The AdamW kernel: DeepSpeed's FusedAdam, torch's fused AdamW (one kernel for all parameters), or torch's
    default (foreach). auto = DeepSpeed's on CUDA, torch's default on CPU (DeepSpeed's CPU Adam needs a long
    JIT build). bench/gpu/verify.py measures the two fused ones against each other."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "> 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 = off)")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine to min_lr_ratio; wsd: warmup, stable, then linear decay over decay_fraction."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd only: the last fraction of the run spent decaying."""

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "in (0, 1]")


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based) of a `total_steps` run."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup -> stable at the peak -> linear decay to the floor over the last decay_fraction of the run
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1 - floor) * progress


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as `cfg.impl` says (auto: DeepSpeed FusedAdam on CUDA, torch AdamW on CPU)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    impl = cfg.impl if cfg.impl != "auto" else ("deepspeed_fused" if device.type == "cuda" else "torch")
    if impl == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kwargs)
    # fused=False is not the default: it also turns off torch's own choice of implementation (slower on CPU)
    return torch.optim.AdamW(params, **kwargs, **({"fused": True} if impl == "torch_fused" else {}))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings' 1-D params (the usual GPT recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
