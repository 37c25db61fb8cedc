"""A toy objective with a trainable projection head, and a script that trains with it (for the two-process test):

    python -m torch.distributed.run --nproc_per_node 2 tests/heads_run.py OUT_DIR CONFIG [key=value ...]

Each rank saves its copy of the head's weights to OUT_DIR/head_init_rank{r}.pt before training and to
OUT_DIR/head_rank{r}.pt after.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from slm_assist.core import dist
from slm_assist.core.config import load_config
from slm_assist.salt.recipe import RunConfig
from slm_assist.training.batches import Batch
from slm_assist.training.objective import Objective
from slm_assist.training.trainer import RunData, Trainer


class ProjectedCE(Objective):
    """CE plus a small latent term through a trainable projection of the last hidden state."""

    def __init__(self, hidden: int, attn_implementation: str | None = None) -> None:
        self.proj = torch.nn.Linear(hidden, 8)
        self.attn_implementation = attn_implementation

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.proj]

    def __call__(self, model, batch: Batch, step: int):
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, output_hidden_states=True)
        latent = self.proj(out.hidden_states[-1]).float().pow(2).mean()
        return out.loss + 0.1 * latent, {"ce": out.loss.detach(), "latent": latent.detach()}


def trainer(cfg: RunConfig, **objective_kw) -> Trainer:
    data = RunData(cfg)
    return Trainer(cfg, ProjectedCE(cfg.model.hidden_size, **objective_kw), data=data)


if __name__ == "__main__":
    out, config, *overrides = sys.argv[1:]
    t = trainer(load_config(RunConfig, config, overrides))
    torch.save(t.objective.proj.state_dict(), Path(out) / f"head_init_rank{dist.rank()}.pt")
    t.fit()
    torch.save(t.objective.proj.state_dict(), Path(out) / f"head_rank{dist.rank()}.pt")
