"""`python -m slm_assist.train CONFIG [key=value ...]`: pretrain a causal LM with DeepSpeed.

Runs as a plain process, under `torchrun`, or under the `deepspeed` launcher. Resumes from the newest complete
checkpoint in run_dir; exports the final model with `save_pretrained` to run_dir/final.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from slm_assist import dist
from slm_assist.checkpoint import CheckpointConfig, Checkpointer, TrainState
from slm_assist.config import check, load_config, save_config, split_argv, to_dict
from slm_assist.data import DataConfig, ShardedBatches, load_split, read_index, validation_batches
from slm_assist.distill import DistillConfig, SALTObjective, load_cache, load_teacher
from slm_assist.engine import deepspeed_config, initialize
from slm_assist.errors import UserError
from slm_assist.metrics import MetricsLogger
from slm_assist.models import ModelConfig, build_model, count_params, flops_per_token
from slm_assist.objectives import CausalLMObjective, Objective, eval_loss
from slm_assist.optim import OptimConfig, ScheduleConfig

USAGE = "python -m slm_assist.train CONFIG [key=value ...]"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps in the run (the LR schedule spans them)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (HF gradient checkpointing): less memory, ~30% more compute."""
    eval_every: int = 100
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int = 20
    """Validation micro-batches per rank (-1 = the whole validation split)."""
    log_every: int = 10
    """Write metrics every N steps."""
    torch_threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device (H100/H200 SXM: 989, A100: 312). > 0 logs `mfu`: model FLOPs per
    token (models.flops_per_token) x tokens/s / (peak x devices)."""

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "max_steps", self.max_steps, "> 0")
        check(self.micro_batch_size > 0, "micro_batch_size", self.micro_batch_size, "> 0")
        check(self.grad_accum > 0, "grad_accum", self.grad_accum, "> 0")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "0, 1, 2 or 3")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0 (0 = only at the end)")
        check(self.eval_batches == -1 or self.eval_batches > 0, "eval_batches", self.eval_batches, "-1 or > 0")
        check(self.log_every > 0, "log_every", self.log_every, "> 0")
        check(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, ">= 0 (0 = do not log MFU)")


@dataclass
class RunConfig:
    run_dir: str = "runs/demo/llm"
    """Checkpoints, metrics, TensorBoard, config.yaml and final/ go here."""
    seed: int = 0
    """Seeds model init and every RNG."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


class NonFiniteLossError(UserError):
    pass


class Trainer:
    """Builds the engine, data and logging from a RunConfig, then runs `fit()`; the loss comes from `objective`."""

    def __init__(self, cfg: RunConfig, objective: Objective | None = None) -> None:
        from data_tools.pack import read_manifest
        from data_tools.tokenizer import load_tokenizer, tokenizer_fingerprint

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        dist.init()
        self.device = dist.device()
        if cfg.train.torch_threads > 0:
            torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.seed)

        self.manifest = read_manifest(cfg.data.path)
        self.tokenizer = load_tokenizer(Path(cfg.data.path) / "tokenizer")
        if tokenizer_fingerprint(self.tokenizer) != self.manifest["tokenizer_fingerprint"]:
            raise UserError(f"{cfg.data.path}: tokenizer/ does not match the manifest's tokenizer_fingerprint; "
                            "the data was packed with another tokenizer: re-run data_tools.pack")
        self.train_ds = load_split(cfg.data.path, "train")
        self.val_batches = (
            validation_batches(load_split(cfg.data.path, "validation"), cfg.train.micro_batch_size,
                               cfg.train.eval_batches, dist.rank(), dist.world_size())
            if "validation" in self.manifest["splits"] else []
        )
        # Named batch streams; the objective picks one per step (SALT: the selected subset during the KD phase).
        stream_args = (cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.data.seed)
        self.streams = {"main": ShardedBatches(self.train_ds, *stream_args)}
        if cfg.distill.selection:
            rows = read_index(cfg.distill.selection, len(self.train_ds), "distill.selection")
            self.streams["kd"] = ShardedBatches(self.train_ds, *stream_args, rows=rows)

        # Built in fp32: with bf16 on, DeepSpeed casts the module and keeps fp32 masters in the optimizer.
        model = build_model(cfg.model, self.tokenizer, self.device, dtype=torch.float32)
        if cfg.train.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, self.manifest["seq_len"])
        if objective is None and cfg.distill.enabled:  # all checks before any step
            vocab = len(self.tokenizer)
            teacher = (load_teacher(cfg.distill.teacher, self.manifest["tokenizer_fingerprint"], vocab, self.device)
                       if cfg.distill.teacher else None)
            cache = load_cache(cfg.distill.cache, self.manifest) if cfg.distill.cache else None
            probe = self.val_batches[0] if self.val_batches else None
            objective = SALTObjective(cfg.distill, teacher, vocab, cfg.train.max_steps, probe_batch=probe, cache=cache)
        self.objective = objective or CausalLMObjective()
        self.ds_config = deepspeed_config(
            micro_batch=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, world=dist.world_size(),
            dtype=cfg.train.dtype, zero_stage=cfg.train.zero_stage, grad_clip=cfg.optim.grad_clip)
        self.engine = initialize(model, self.ds_config, cfg.optim, cfg.schedule, cfg.train.max_steps, self.device)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint)
        self.state = TrainState()
        self.tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * dist.world_size() * self.manifest["seq_len"]

    # ---- steps -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns step-mean metrics."""
        sums: dict[str, float] = {}
        batches = self.streams.get(self.objective.stream(self.state.step), self.streams["main"])
        for _ in range(self.cfg.train.grad_accum):
            ids, index = batches.next_with_index()
            loss, metrics = self.objective(self.engine, ids.to(self.device), self.state.step, index=index)
            if dist.any_rank(not math.isfinite(loss.item())):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {self.state.step + 1} (micro-batch of epoch "
                    f"{batches.epoch}, position {batches.cursor}); no checkpoint written, the last good "
                    f"one stays in {self.checkpointer.root}. Lower optim.lr or check the data")
            self.engine.backward(loss)
            self.engine.step()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / self.cfg.train.grad_accum for k, v in sums.items()}

    def evaluate(self) -> float | None:
        if not self.val_batches:
            return None
        self.engine.eval()
        total, count = eval_loss(self.engine, self.val_batches, self.device)
        self.engine.train()
        total, count = dist.all_reduce_sum([total, float(count)])
        return total / count

    # ---- run ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        self.checkpointer.clean_partial()
        latest = self.checkpointer.latest() if self.cfg.checkpoint.resume else None
        if latest is None:
            return
        self.state = self.checkpointer.load(self.engine, latest)
        for name, stream in self.streams.items():
            if name in self.state.data:
                stream.load_state_dict(self.state.data[name])
        self.objective.load_state_dict(self.state.objective)
        if dist.is_main():
            print(f"resumed from {latest} (step {self.state.step})", flush=True)

    def save(self) -> None:
        self.state.data = {name: stream.state_dict() for name, stream in self.streams.items()}
        self.state.objective = self.objective.state_dict()
        self.checkpointer.save(self.engine, self.state)

    def fit(self) -> dict[str, float | None]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        self.resume()
        logger = MetricsLogger(self.run_dir, enabled=dist.is_main())
        logger.truncate_after(self.state.step)
        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, disable=not dist.is_main(),
                   desc=self.run_dir.name, unit="step", dynamic_ncols=True)
        last_val: float | None = None
        window_t, window_tokens = time.perf_counter(), 0
        try:
            while self.state.step < cfg.train.max_steps:
                lr = self.engine.get_lr()[0]  # the LR this step uses (the scheduler advances inside step())
                metrics = self.train_step()
                self.state.step += 1
                self.state.tokens_seen += self.tokens_per_step
                window_tokens += self.tokens_per_step
                step = self.state.step
                is_last = step == cfg.train.max_steps
                record: dict[str, float | None] = {}
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_last:
                    last_val = record["val_loss"] = self.evaluate()
                if step % cfg.train.log_every == 0 or is_last or "val_loss" in record:
                    elapsed = time.perf_counter() - window_t
                    gn = self.engine.get_global_grad_norm()
                    tps = window_tokens / max(elapsed, 1e-9)
                    record.update(metrics, lr=lr, tokens=self.state.tokens_seen, tokens_per_s=tps,
                                  grad_norm=float(gn) if gn is not None else None)
                    if cfg.train.peak_tflops:
                        record["mfu"] = self.flops_per_token * tps / (cfg.train.peak_tflops * 1e12 * dist.world_size())
                    logger.log(step, record)
                    window_t, window_tokens = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", **({"val": f"{last_val:.3f}"} if last_val else {}))
                bar.update(1)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or is_last:
                    self.save()
        finally:
            bar.close()
            logger.close()
        self.export()
        return {"step": self.state.step, "val_loss": last_val}

    def export(self) -> Path:
        """save_pretrained (safetensors) + tokenizer + run metadata into run_dir/final, atomically, on rank 0."""
        from slm_assist.fsutil import atomic_output_dir

        final = self.run_dir / "final"
        state_dict = (self.engine._zero3_consolidated_16bit_state_dict()
                      if self.cfg.train.zero_stage == 3 else None)  # collective: every rank calls it
        if dist.is_main():
            model = self.engine.module
            with atomic_output_dir(final, overwrite=True) as tmp:
                model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp))
                meta = {"run_config": to_dict(self.cfg), "data_manifest": self.manifest,
                        "params": self.n_params, "step": self.state.step, "tokens_seen": self.state.tokens_seen}
                (tmp / "slm_assist.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        dist.barrier()
        return final


def main(argv: Sequence[str]) -> dict:
    path, overrides = split_argv(argv, USAGE)
    cfg = load_config(RunConfig, path, overrides)
    trainer = Trainer(cfg)
    if dist.is_main():
        print(f"model: {trainer.n_params / 1e6:.2f}M params, {cfg.model.model_type}, "
              f"attn={trainer.engine.module.config._attn_implementation}, dtype={cfg.train.dtype}, "
              f"zero={cfg.train.zero_stage}, world={dist.world_size()}", flush=True)
    result = trainer.fit()
    if dist.is_main():
        print(f"done: step {result['step']}, val_loss {result['val_loss']}, model in {trainer.run_dir / 'final'}")
    return result


if __name__ == "__main__":
    from slm_assist.errors import run_cli

    run_cli(main)
