"""Atomic, resumable checkpoints: the DeepSpeed engine state plus one TrainState, complete or absent.

Layout: `<run_dir>/checkpoints/step_00000100/` holds DeepSpeed's files (model, optimizer, LR scheduler) and
`train_state_rank{r}.pt` (step, data position, objective state, RNG). Everything is written under a
`.tmp-step_*` name and renamed when every rank has finished, so a crash or `kill -9` mid-write leaves only a
temp directory, which the next start removes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm_assist.core import dist
from slm_assist.core.config import check
from slm_assist.core.errors import UserError
from slm_assist.core.faults import fault

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run_dir when there is one."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", self.every, ">= 0 (0 = only at the end)")
        check(self.keep_last >= 1, "keep_last", self.keep_last, ">= 1")


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler needed to continue bit-exactly."""

    step: int = 0
    tokens_seen: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    best_val: float | None = None
    """train.patience: the best validation loss so far, and evaluations since it."""
    evals_since_best: int = 0
    stopped_early: bool = False
    last_val: float | None = None
    """The latest validation loss (a run resumed at its end still reports it)."""


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def clean_partial(self) -> None:
        """Remove temp directories of checkpoints that never committed (rank 0; call before any save)."""
        if dist.is_main() and self.root.is_dir():
            for p in self.root.glob(".tmp-step_*"):
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / "train_state_rank0.pt").is_file())

    @staticmethod
    def step_of(path: Path) -> int:
        return int(_STEP_DIR.match(path.name).group(1))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, state: TrainState) -> Path:
        tag = f"step_{state.step:08d}"
        tmp_tag = f".tmp-{tag}"
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        torch.save({"train_state": state.__dict__, "rng": _rng_state()},
                   self.root / tmp_tag / f"train_state_rank{dist.rank()}.pt")
        dist.barrier()
        fault("kill_before_commit", state.step)
        final = self.root / tag
        if dist.is_main():
            if final.exists():  # a re-save of the same step (e.g. final == periodic): replace it
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)  # make the rename durable before older checkpoints are deleted
            finally:
                os.close(fd)
            # checkpoint.resume=false in an old run_dir: the old run's later checkpoints must not outlive (or,
            # sorting last, prune) the new run's
            for old in [p for p in self.complete() if self.step_of(p) > state.step]:
                shutil.rmtree(old, ignore_errors=True)
            for old in self.complete()[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        fault("kill_after_checkpoint", state.step)
        return final

    def load(self, engine, path: Path) -> TrainState:
        """Restore engine + train state + RNG from a complete checkpoint; a damaged one is a clear error."""
        try:
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:
            raise UserError(f"checkpoint {path} is corrupt or incompatible with this config: {type(e).__name__}: {e}. "
                            "Delete it to resume from an older one, or set checkpoint.resume=false") from None
        if load_path is None:
            raise UserError(f"checkpoint {path}: DeepSpeed found nothing to load")
        own = path / f"train_state_rank{dist.rank()}.pt"
        try:
            blob = torch.load(own if own.is_file() else path / "train_state_rank0.pt", weights_only=False)
        except Exception as e:
            raise UserError(f"checkpoint {path}: corrupt train state: {e}") from None
        _set_rng_state(blob["rng"])
        return TrainState(**blob["train_state"])
