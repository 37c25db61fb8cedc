"""The KD-weight schedule w_t of a (1 - w_t)·CE + w_t·KD objective (SALT's central knob)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from slm_assist.core.config import check, check_no_effect


@dataclass
class KDScheduleConfig:
    kind: Literal["constant", "step", "linear", "linear_ratio", "wsd"] = "step"
    """constant: w always. step: w until n_kd, then 0 (SALT's default). linear: w decaying linearly to 0 at
    n_kd. linear_ratio: the KD:CE ratio w/(1-w) decays linearly to 0 at n_kd. wsd: warm up from 0 to w over
    warmup_steps, hold, then decay linearly to 0 over the last decay_fraction of the KD phase."""
    weight: float = 0.667
    """w: the KD weight during the KD phase, in [0, 1]."""
    n_kd_steps: int = -1
    """Length of the KD phase in optimizer steps (-1 = use n_kd_fraction)."""
    n_kd_fraction: float = 0.2
    """Length of the KD phase as a fraction of train.max_steps (SALT: ~0.17, robust from 0.1 to 0.3)."""
    warmup_steps: int = 0
    """wsd only."""
    decay_fraction: float = 0.2
    """wsd only: fraction of the KD phase spent decaying."""
    exit_fraction: float = 0.0
    """step only: leave the KD phase gently. After n_kd, w decays from its KD-phase level to 0 over this fraction
    of train.max_steps instead of dropping at once (0 = SALT's step). The student leads the CE baseline most when
    the KD phase ends and loses part of that lead right after an abrupt drop (bench/RESULTS.md, issue 13)."""
    exit_shape: Literal["linear", "cosine"] = "linear"
    """The exit window's decay: linear, or cosine (slow at first, then fast)."""

    def __post_init__(self) -> None:
        check(0.0 <= self.weight <= 1.0, "weight", self.weight, "in [0, 1]")
        check(self.n_kd_steps == -1 or self.n_kd_steps >= 0, "n_kd_steps", self.n_kd_steps, "-1 or >= 0")
        check(0.0 <= self.n_kd_fraction <= 1.0, "n_kd_fraction", self.n_kd_fraction, "in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        check(0.0 < self.decay_fraction <= 1.0, "decay_fraction", self.decay_fraction, "in (0, 1]")
        check(0.0 <= self.exit_fraction <= 1.0, "exit_fraction", self.exit_fraction, "in [0, 1]")
        if self.kind != "wsd":
            check_no_effect(self, ["warmup_steps", "decay_fraction"], f"with schedule.kind={self.kind}")
        if self.kind != "step":
            check_no_effect(self, ["exit_fraction"], f"with schedule.kind={self.kind} (its w does not drop at n_kd)")
        if not self.exit_fraction:
            check_no_effect(self, ["exit_shape"], "with exit_fraction=0")
        if self.kind == "constant":
            check_no_effect(self, ["n_kd_steps", "n_kd_fraction"], "with schedule.kind=constant (KD throughout)")
        elif self.n_kd_steps >= 0:
            check_no_effect(self, ["n_kd_fraction"], f"with schedule.n_kd_steps={self.n_kd_steps}")

    def n_kd(self, total_steps: int) -> int:
        """The KD phase length in steps: steps [0, n_kd) are the KD phase."""
        return self.n_kd_steps if self.n_kd_steps >= 0 else round(self.n_kd_fraction * total_steps)

    def n_exit(self, total_steps: int) -> int:
        """The exit window's length in steps: steps [n_kd, n_kd + n_exit) still have 0 < w_t < w."""
        return round(self.exit_fraction * total_steps)


def kd_weight(step: int, total_steps: int, cfg: KDScheduleConfig) -> float:
    """w_t for optimizer step `step` (0-based)."""
    w, n = cfg.weight, cfg.n_kd(total_steps)
    if cfg.kind == "constant":
        return w
    if cfg.kind == "step" and step >= n:
        k, e = step - n + 1, cfg.n_exit(total_steps)  # k-th step of the exit window; w reaches 0 at k = e + 1
        if k > e:
            return 0.0
        left = 1 - k / (e + 1)
        return w * (left if cfg.exit_shape == "linear" else 0.5 * (1 - math.cos(math.pi * left)))
    if step >= n:
        return 0.0
    if cfg.kind == "step":
        return w
    if cfg.kind == "linear":
        return w * (1 - step / n)
    if cfg.kind == "linear_ratio":
        if w >= 1.0:
            return 1.0
        ratio = w / (1 - w) * (1 - step / n)
        return ratio / (1 + ratio)
    # wsd
    if step < cfg.warmup_steps:
        return w * (step + 1) / cfg.warmup_steps
    decay = max(1, round(cfg.decay_fraction * n))
    start = max(cfg.warmup_steps, n - decay)
    if step < start:
        return w
    return w * (1 - (step - start) / max(1, n - start))
