"""Training objectives: what the trainer minimises. An objective maps (model, batch, step) to a scalar loss plus
detached metrics. It may carry state that is checkpointed with the run (e.g. a KD phase), bring trainable modules
of its own (e.g. projection heads), and name the attention implementation it needs. Recipes subclass
`Objective`; the Trainer knows nothing else about them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from slm_assist.training.batches import Batch


class Objective:
    """The interface the Trainer calls, with the defaults of a stateless objective on the full split."""

    attn_implementation: str | None = None
    """The attention the objective needs (e.g. "eager" to read attention probabilities); None = any."""
    z_loss: float = 0.0
    """Coefficient of the z-loss `z · log² Z` on the student's logits (PaLM), given at construction from
    train.z_loss: every objective adds it (`ce_with_z_loss`, `mixed_ce_kd`)."""

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one micro-batch at optimizer step `step` (0-based), and metrics to log (detached)."""
        raise NotImplementedError

    def stream(self, step: int) -> str:
        """Which batch stream step `step` draws from: "main" (the full split) or a recipe's own (e.g. "kd")."""
        return "main"

    def attach(self, batch: Batch) -> Batch:
        """The host-side data a batch needs besides its tokens (e.g. cached soft labels), read with it: the
        Trainer installs this on every stream, which calls it where the batch is read (a prefetch thread on
        CUDA), so it must be thread-safe and only read. Default: nothing."""
        return batch

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules trained with the model (optimizer, all-reduce, checkpoint) but not exported with it."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CausalLMObjective(Objective):
    """Plain next-token cross-entropy (the HF model shifts the labels; masked tokens are ignored)."""

    def __init__(self, z_loss: float = 0.0) -> None:
        self.z_loss = z_loss

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch.input_ids if batch.labels is None else batch.labels
        if batch.loss_mask is not None:
            labels = labels.masked_fill(batch.loss_mask == 0, -100)  # HF's ignore_index
        if not self.z_loss:
            loss = model(input_ids=batch.input_ids, labels=labels).loss
            return loss, {"ce": loss.detach()}
        return ce_with_z_loss(model(input_ids=batch.input_ids).logits[:, :-1], labels[:, 1:], self.z_loss)


def ce_with_z_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token CE plus `z_loss · mean(log² Z)` over the targets that are not -100, in fp32; metrics `ce`,
    and `z` (the mean log² Z) when z_loss > 0. The penalty keeps the softmax normaliser near 1, which PaLM found
    to stabilise training, and costs nothing beyond the log-sum-exp the CE computes anyway."""
    flat, y = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    keep = y != -100
    if not keep.all():  # indexing copies [N, V]; packed pretraining masks nothing
        flat, y = flat[keep], y[keep]
    log_z = flat.logsumexp(-1)
    ce = (log_z - flat.gather(-1, y[:, None]).squeeze(-1)).mean()
    if not z_loss:
        return ce, {"ce": ce.detach()}
    z = log_z.square().mean()
    return ce + z_loss * z, {"ce": ce.detach(), "z": z.detach()}


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: Iterable[torch.Tensor], vocab: int,
              device: torch.device) -> tuple[float, int]:
    """Summed next-token CE and token count over batches of input ids (callers all-reduce and divide): the one
    definition of a model's loss on data, behind the logged val_loss, eval.json's loss and SALT's auto handover.

    Scored on the first `vocab` output rows, the tokenizer's real vocabulary: rows a padded embedding adds
    (model.pad_vocab_to) are never tokens, so they take no probability mass. `model` may be a DeepSpeed engine or
    a bf16 model: the logits are upcast to fp32 a chunk at a time (16 MiB on CPU, 64 MiB on a GPU, as
    kd.losses.chunk_tokens), never as a whole [B, T, V] copy; one host sync per call."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for ids in batches:
        b, t = ids.shape[0], ids.shape[1] - 1
        if b == 0 or t < 1:
            continue
        ids = ids.to(device)
        logits, targets = model(input_ids=ids).logits[:, :-1], ids[:, 1:]  # views
        chunk = max(1, ((64 if logits.is_cuda else 16) << 20) // (4 * vocab))
        rows, span = (max(1, chunk // t), t) if chunk >= t else (1, chunk)  # whole rows per chunk, or a row's span
        for r in range(0, b, rows):
            for s in range(0, t, span):
                x = logits[r : r + rows, s : s + span, :vocab].float().reshape(-1, vocab)
                y = targets[r : r + rows, s : s + span].reshape(-1)
                total += F.cross_entropy(x, y, reduction="sum")
        count += b * t
    return total.item(), count
