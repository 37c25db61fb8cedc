"""Atomic, resumable checkpoints: the DeepSpeed engine state plus one TrainState, complete or absent; and what a
launch resumes (`open_run`: the run directory's lock, the newest intact checkpoint, the relaunch rules).

Layout (core/run_dir.py owns it): `<run_dir>/checkpoints/step_00000100/` holds DeepSpeed's files (model,
optimizer, LR scheduler), `train_state_rank{r}.json` (step, data position, objective state, Python and NumPy RNG)
with `rng_rank{r}.safetensors` (torch's RNG), and the record RunDir.commit writes last (the config that made it, a
checksum of every file). Everything is written under a `.tmp-step_*` name and renamed when every rank has
finished, so a crash or `kill -9` mid-write leaves only a temp directory, which the next start removes.

Nothing here unpickles: the train state is JSON + safetensors, and DeepSpeed's own files are read with
`torch.load(weights_only=True)`, so a run directory copied from elsewhere cannot run code on resume.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slm_assist.core import dist
from slm_assist.core.config import check, path_settings, to_dict
from slm_assist.core.errors import UserError, brief
from slm_assist.core.faults import fault
from slm_assist.core.files import file_sha256, no_space_error, out_of_space, plain_mode
from slm_assist.core.model_dir import META
from slm_assist.core.relaunch import Relaunch, RelaunchRules, input_fingerprints
from slm_assist.core.run_dir import RunDir


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest K checkpoints, delete older ones."""
    resume: bool = True
    """Resume from the newest intact checkpoint in run_dir when there is one."""
    allow_changes: list[str] = field(default_factory=list)
    """Settings (dotted keys, or whole sections such as `optim`) that may differ from the config that made the
    checkpoint being resumed: a resume that changes the math is refused without them. With them the run resumes
    its state from the checkpoint (weights, optimizer moments, data position, RNG), the optimizer's settings take
    their new values, and the run's history (in the exported metadata) records the old and the new. [] = none."""

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


STATE = "train_state_rank{}.json"
RNG = "rng_rank{}.safetensors"


def _host_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def _set_host_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _device_rng() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _safe_deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers: plain data types,
    allowed by name so that `weights_only=True` can read them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def read_deepspeed_file(path: str | Path, map_location=None) -> Any:
    """One of DeepSpeed's checkpoint files, read with `torch.load(weights_only=True)`: tensors, containers and the
    few plain classes above, never arbitrary pickled code."""
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UserError(f"{path}: holds pickled objects other than tensors and plain data"
                        + (f" ({found.group(1)})" if found else "") + "; it was not written by this tool or was "
                        "altered, and it is not loaded (unpickling it could run code)") from None


def load_safely(engine) -> None:
    """Make the engine read its checkpoint files with `read_deepspeed_file` (DeepSpeed's own loader unpickles
    anything: a planted file would run code on resume)."""
    engine.checkpoint_engine.load = read_deepspeed_file


def _my_share(names: list[str]) -> list[str]:
    """This rank's part of a list of files to hash: ranks hash side by side, not rank 0 alone."""
    return names[dist.rank()::dist.world_size()]


def _gathered(local: dict[str, Any]) -> dict[str, Any]:
    if dist.world_size() == 1:
        return local
    parts: list[dict[str, Any]] = [{} for _ in range(dist.world_size())]
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def find_intact(run: RunDir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files match the checksums of its record, and the damaged newer ones with what
    is wrong (every rank calls it; they split the hashing). Nothing is moved: `RunDir.set_aside` does that once the
    launch is accepted."""
    damaged = []
    for ckpt in reversed(run.checkpoints()):
        try:
            names = sorted(run.record(ckpt).get("files") or {})
        except UserError as e:  # every rank reads the same record: the same outcome
            damaged.append((ckpt, str(e)))
            continue
        problems = _gathered({n: run.damage(ckpt, [n]) for n in _my_share(names)})
        problem = next((problems[n] for n in names if problems.get(n)), None)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


class Checkpointer:
    """Saves and loads the engine and the train state; which checkpoints exist, their records and checksums,
    and what is pruned belong to the run directory's owner (`RunDir`)."""

    def __init__(self, run: RunDir, cfg: CheckpointConfig) -> None:
        self.run = run
        self.root = run.checkpoints_root
        self.cfg = cfg

    def clean_partial(self) -> None:
        """Remove temp directories of checkpoints that never committed (rank 0; call before any save)."""
        if dist.is_main():
            self.run.clean_partial()
        dist.barrier()

    def latest(self) -> Path | None:
        ckpts = self.run.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, engine, state: TrainState, record: dict[str, Any]) -> Path:
        """Write a checkpoint and commit it with `record` (the config and inputs that made it, the history) and the
        checksum of every file. Any failure (a full disk: one clear error) stops every rank; the previous
        checkpoints stay."""
        tag = self.run.checkpoint_tmp(state.step)
        d = self.root / tag
        error: BaseException | None = None
        try:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            text = json.dumps({"train_state": asdict(state), "rng": _host_rng()})
            (d / STATE.format(dist.rank())).write_text(text + "\n", encoding="utf-8")
            save_file(_device_rng(), str(d / RNG.format(dist.rank())))
            os.chmod(d / RNG.format(dist.rank()), plain_mode(is_dir=False))  # safetensors makes it private (0600)
        except Exception as e:  # SafetensorError is neither an OSError nor a RuntimeError
            error = e
        self._stop_if_any(error, state.step)
        dist.barrier()
        fault("kill_before_commit", state.step)
        files = _gathered({n: file_sha256(d / n) for n in _my_share(self.run.files(d))})
        error = None
        if dist.is_main():
            try:
                self.run.commit(state.step, record, files, self.cfg.keep_last)
            except Exception as e:
                error = e
        self._stop_if_any(error, state.step)
        fault("kill_after_checkpoint", state.step)
        return self.root / f"step_{state.step:08d}"

    def _stop_if_any(self, error: BaseException | None, step: int) -> None:
        """Every rank raises if any failed (none waits at a barrier for one that left): a full disk as one clear
        error, after the partial checkpoint is removed."""
        if not dist.any_rank(error is not None):
            return
        full = error is not None and out_of_space(error, self.root)
        if dist.is_main():
            self.run.clean_partial()
        latest = self.latest()
        kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint had been written yet"
        if full:
            raise no_space_error(self.root, f"the checkpoint of step {step}", kept)
        if error is None:
            raise UserError(f"the checkpoint of step {step} failed on another rank; {kept}")
        raise error

    def load(self, engine, path: Path) -> TrainState:
        """Restore engine + train state + RNG from an intact checkpoint (its checksums verified by RunDir)."""
        load_safely(engine)
        try:
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"checkpoint {path} cannot be loaded with this config: {type(e).__name__}: {brief(e)}. "
                            "Set checkpoint.resume=false to start over, or use another run_dir") from None
        if load_path is None:
            raise UserError(f"checkpoint {path}: DeepSpeed found nothing to load")
        r = dist.rank() if (path / STATE.format(dist.rank())).is_file() else 0  # another world size: rank 0's
        try:
            blob = json.loads((path / STATE.format(r)).read_text(encoding="utf-8"))
            rng = load_file(str(path / RNG.format(r)))
            _set_host_rng(blob["rng"])
            state = TrainState(**blob["train_state"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {path}: unreadable train state: {type(e).__name__}: {e}") from None
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return state


# ---- a launch: which checkpoint it resumes, and whether it may -------------------------------------------------
RELAUNCH_RULES = RelaunchRules(
    harmless=("run_dir", "checkpoint", "launch", "train.log_every", "train.eval_every", "train.eval_batches",
              "train.patience", "train.torch_threads", "train.peak_tflops", "train.compile",
              "train.activation_checkpointing", "model.attn_implementation"),
    extendable=("train.max_steps",),
    fixed=("model.model_type", "model.vocab_size", "model.pad_vocab_to", "model.hidden_size", "model.num_layers",
           "model.num_heads", "model.num_kv_heads", "model.ffn_size", "model.max_position_embeddings",
           "model.tie_word_embeddings", "model.hf_overrides", "train.dtype", "train.zero_stage"),
)
"""What a resumed run may change: cadences, evaluation, threads, kernels and the world size freely (with a line);
a longer run with a note (the LR schedule, and SALT's KD phase when it is a fraction of the run, re-span the new
length); everything else only with checkpoint.allow_changes, except the settings the checkpoint's tensors are
shaped by."""


def launch_config(cfg: Any) -> dict[str, Any]:
    """What a checkpoint records and a relaunch compares: the resolved config, and the world size it ran on (a
    change of it changes the global batch: accepted, and said)."""
    return {**to_dict(cfg), "launch": {"world_size": dist.world_size()}}


def open_run(cfg: Any, extra: dict[str, str] | None = None) -> tuple[RunDir, dict[str, str], Relaunch]:
    """Take the run directory for a launch before anything is written or built: its lock (rank 0), the newest
    intact checkpoint (every rank hashes its share), and this launch checked against the config and inputs that
    made that checkpoint (rank 0). Only then are damaged checkpoints set aside, or, with checkpoint.resume=false,
    the previous run's checkpoints removed. Every rank gets the outcome or the same error. Returns the run
    directory, the content fingerprints of the run's inputs, and what resuming means."""
    run = RunDir(cfg.run_dir)
    dist.on_main(run.lock)
    try:
        checkpoint, damaged = None, []
        if cfg.checkpoint.resume:
            dist.on_main(lambda: _check_resumable(run, cfg))
            checkpoint, damaged = find_intact(run)
            if checkpoint is None and (damaged or run.damaged()):
                listed = "; ".join(f"{c.name}: {why}" for c, why in damaged) or \
                    f"the damaged ones are set aside in {run.checkpoints_root}"
                raise UserError(f"run_dir={cfg.run_dir}: no intact checkpoint is left to resume ({listed}); set "
                                "checkpoint.resume=false to start over")

        def take() -> tuple[dict[str, str], Relaunch]:
            inputs = input_fingerprints(to_dict(cfg), path_settings(type(cfg)), extra)
            relaunch = run.check_relaunch(launch_config(cfg), inputs, RELAUNCH_RULES, checkpoint)
            for ckpt, problem in damaged:
                run.set_aside(ckpt, problem)
            if not cfg.checkpoint.resume and (n := run.discard_checkpoints()):
                print(f"run_dir={cfg.run_dir}: checkpoint.resume=false: starting over, removed the previous run's {n} "
                      "checkpoint(s)", flush=True)
            return inputs, relaunch

        inputs, relaunch = dist.on_main(take)
    except BaseException:
        if dist.is_main():
            run.unlock()
        raise
    return run, inputs, relaunch


def _check_resumable(run: RunDir, cfg: Any) -> None:
    """Checkpoints this version can check and load, and no finished model without one to compare with."""
    legacy = run.legacy_checkpoints()
    if legacy:
        raise UserError(f"run_dir={cfg.run_dir}: {legacy[-1]} was written by an older slm_assist (no integrity "
                        "record, and a pickled train state, which is not loaded: a pickle can run code); set "
                        "checkpoint.resume=false to start over, or use another run_dir")
    if not run.checkpoints() and not run.damaged() and (run.final / META).is_file():
        raise UserError(f"run_dir={cfg.run_dir} holds a finished model in final/ but no checkpoint to resume or to "
                        "check this launch against (they were deleted); use another run_dir (model.pretrained= its "
                        "final/ starts a new run from it), or set checkpoint.resume=false to train it again from "
                        "scratch (final/ is then replaced, keeping files you added there)")
