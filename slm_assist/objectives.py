"""Training objectives: what the trainer minimises. An objective maps (model, batch) to a scalar loss plus
detached metrics, and may carry state that is checkpointed with the run (e.g. a KD phase)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, step: int,
                 index: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one micro-batch at optimizer step `step` (0-based), and metrics to log (detached).
        `index` holds the sequences' indices in the split (soft-label cache lookups)."""

    def stream(self, step: int) -> str:
        """Which batch stream step `step` draws from: "main" (the full split) or "kd" (the selected subset)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CausalLMObjective:
    """Plain next-token cross-entropy on packed sequences (labels = inputs; the HF model shifts them)."""

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, step: int,
                 index: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        return loss, {"ce": loss.detach()}

    def stream(self, step: int) -> str:
        return "main"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> tuple[float, int]:
    """Summed token CE and token count over fixed batches (callers all-reduce and divide)."""
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += loss.float().item() * n
        count += n
    return total, count
