"""The one training loop: `Trainer(cfg, objective, streams)` pretrains or distils a causal LM with DeepSpeed.

It knows no recipe: the loss comes from the `Objective`, extra batch streams (e.g. a selected subset) from the
caller. It runs as a plain process, under `torchrun`, or under the `deepspeed` launcher; resumes from the newest
complete checkpoint in run_dir; and exports the final model with `save_pretrained` to run_dir/final.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from slm_assist.core import dist
from slm_assist.core.config import check, to_dict
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError
from slm_assist.core.files import atomic_output_dir, check_writable, clean_stale
from slm_assist.core.model_dir import CONFIG as MODEL_CONFIG
from slm_assist.core.model_dir import META, MODEL_FILES, ModelDir, write_model_dir
from slm_assist.core.relaunch import relative_to_run
from slm_assist.training.batches import DataConfig, ShardedBatches, validation_batches
from slm_assist.training.checkpoint import CheckpointConfig, Checkpointer, TrainState, launch_config, open_run
from slm_assist.training.engine import ModelWithHeads, deepspeed_config, initialize, reapply_optim
from slm_assist.training.metrics import StepReporter
from slm_assist.training.models import ModelConfig, build_model, compile_layers, count_params, flops_per_token
from slm_assist.training.objective import Objective, eval_loss
from slm_assist.training.optim import OptimConfig, ScheduleConfig


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
    compile: bool | None = None
    """torch.compile each decoder layer (with the KV cache off). null = auto: on CUDA, off on CPU (where the
    compile time is not paid back at these sizes). Not with ZeRO-3, whose parameter hooks dynamo cannot trace
    in DeepSpeed 0.19."""
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
    patience: int = 0
    """Stop early once the validation loss has not improved for this many evaluations in a row (0 = off); the
    LR schedule still spans max_steps."""
    z_loss: float = 0.0
    """Coefficient of the z-loss `z · log² Z` (PaLM; 1e-4 is the usual value) added to the loss of every
    objective: it keeps the student's softmax normaliser near 1. 0 = off."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device (H100/H200 SXM: 989, A100: 312). > 0 logs `mfu`: model FLOPs per
    token (models.flops_per_token) x tokens/s / (peak x devices)."""

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "max_steps", self.max_steps, "> 0")
        check(self.micro_batch_size > 0, "micro_batch_size", self.micro_batch_size, "> 0")
        check(self.grad_accum > 0, "grad_accum", self.grad_accum, "> 0")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "0, 1, 2 or 3")
        if self.compile:
            check(self.zero_stage != 3, "compile", self.compile, "null or false with zero_stage=3 (ZeRO-3's "
                  "parameter gathering hooks break dynamo's trace in this DeepSpeed)")
        check(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0 (0 = only at the end)")
        check(self.eval_batches == -1 or self.eval_batches > 0, "eval_batches", self.eval_batches, "-1 or > 0")
        check(self.log_every > 0, "log_every", self.log_every, "> 0")
        check(self.patience >= 0, "patience", self.patience, ">= 0 (0 = off)")
        if self.patience:
            check(self.eval_every > 0, "eval_every", self.eval_every, "> 0 with train.patience (it counts evaluations)")
        check(self.z_loss >= 0, "z_loss", self.z_loss, ">= 0 (0 = off)")
        check(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, ">= 0 (0 = do not log MFU)")

    def compiles(self, device: torch.device) -> bool:
        """Whether models on `device` get their layers compiled (the student, and a SALT teacher)."""
        if self.compile is None:
            return device.type == "cuda" and self.zero_stage != 3
        return self.compile


@dataclass
class TrainingSections:
    """The sections every recipe's config composes (a pretraining run's, compress's for all its stages): one
    declaration of each, so that neither recipe copies the other's fields."""

    run_dir: str = "runs/demo/llm"
    """Checkpoints, metrics, TensorBoard, config.yaml and final/ go here."""
    seed: int = 0
    """Seeds model init and every RNG."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class TrainerConfig(TrainingSections):
    """The sections of one Trainer run: the shared ones and its data; a recipe's config adds its own (SALT:
    `distill`)."""

    data: DataConfig = field(default_factory=DataConfig)


class NonFiniteLossError(UserError):
    pass


class RunData:
    """What a run reads before any model exists, set up once and shared by the recipe and the Trainer: the process
    group and CPU threads, the packed dataset (its tokenizer checked against the manifest), the train split, and
    this rank's fixed validation batches."""

    def __init__(self, cfg: TrainerConfig, inputs: dict[str, str] | None = None) -> None:
        """`inputs`: artifacts the run reads that are not settings of `cfg` ({name: path}, e.g. a compress stage's
        teacher): a resume checks that their content has not changed either."""
        self.cfg = cfg
        check_writable(cfg.run_dir, "run_dir")  # before any expensive work
        dist.init()
        self.device = dist.device()
        if cfg.train.torch_threads > 0:
            torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.seed)  # objectives that build modules of their own build them seeded
        self.dataset = PackedDataset.open(cfg.data.path)
        self.tokenizer = self.dataset.tokenizer
        _check_model_fits(cfg.model, self.dataset)
        self.run, self.inputs, self.relaunch = open_run(cfg, inputs)
        self.train = self.dataset.split("train")
        self.val_batches = (
            validation_batches(self.dataset.split("validation"), cfg.train.micro_batch_size, cfg.train.eval_batches,
                               dist.rank(), dist.world_size())
            if self.dataset.has_split("validation") else []
        )

    def release(self) -> None:
        """Give the run directory back (when what was built on this RunData fails before training)."""
        if dist.is_main():
            self.run.unlock()

    def stream(self, rows: np.ndarray | None = None) -> ShardedBatches:
        """This rank's batches over the train split, or over its `rows` (a selected subset)."""
        return ShardedBatches(self.train, self.cfg.train.micro_batch_size, dist.rank(), dist.world_size(),
                              self.cfg.data.seed, rows=rows)


class Trainer:
    """Builds the model, engine and logging, then runs `fit()`. The loss comes from `objective`; each step draws
    from the stream the objective names (`"main"`, the full train split, always exists; `streams` adds more).
    `data` passes a RunData the caller already set up for `cfg`; `recipe` names the recipe in the exported
    metadata, by which reports and cards find its description."""

    def __init__(self, cfg: TrainerConfig, objective: Objective, streams: dict[str, ShardedBatches] | None = None,
                 data: RunData | None = None, recipe: str = "salt") -> None:
        self.cfg, self.objective, self.recipe = cfg, objective, recipe
        self.run_dir = Path(cfg.run_dir)
        self.data = data or RunData(cfg)
        self.device, self.tokenizer = self.data.device, self.data.tokenizer
        self.manifest = self.data.dataset.manifest
        self.streams = {"main": self.data.stream(), **(streams or {})}
        for stream in self.streams.values():
            if stream.prefetches:  # what a batch needs besides its tokens, read with it off the training thread
                stream.attach = objective.attach
        self.run = self.data.run
        self.checkpointer = Checkpointer(self.run, cfg.checkpoint)

        # Seeded here, not only in RunData: the student's init must not depend on what the recipe loaded before.
        torch.manual_seed(cfg.seed)
        # Built in fp32: with bf16 on, DeepSpeed casts the module and keeps fp32 masters in the optimizer.
        model = build_model(_model_config(cfg.model, objective), self.tokenizer, self.device, dtype=torch.float32)
        if cfg.train.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.compiles(self.device):
            compile_layers(model)
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, self.data.dataset.seq_len)
        heads = [h.to(self.device) for h in objective.trainable_modules()]
        self.ds_config = deepspeed_config(
            micro_batch=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, world=dist.world_size(),
            dtype=cfg.train.dtype, zero_stage=cfg.train.zero_stage, grad_clip=cfg.optim.grad_clip)
        self.engine = initialize(ModelWithHeads(model, heads) if heads else model, self.ds_config, cfg.optim,
                                 cfg.schedule, cfg.train.max_steps, self.device)
        self.state = TrainState()
        self._bad_at: torch.Tensor | None = None  # see _watch_finite
        self._bad_loss: torch.Tensor | None = None
        self._positions: list[tuple[int, int, int]] = []
        if cfg.train.patience and not self.data.val_batches:
            raise UserError(f"train.patience={cfg.train.patience} needs a validation split; {self.data.dataset.path} "
                            "has none (pack with pack.val_fraction > 0)")
        self.tokens_per_step = (cfg.train.micro_batch_size * cfg.train.grad_accum * dist.world_size()
                                * self.data.dataset.seq_len)

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained, without the objective's heads."""
        module = self.engine.module
        return module.model if isinstance(module, ModelWithHeads) else module

    # ---- steps -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns step-mean metrics as tensors. Nothing here
        waits for the device: a non-finite loss is recorded on it and raised by `check_finite`, which `fit` calls
        before anything reads or saves the weights."""
        sums: dict[str, torch.Tensor] = {}
        name = self.objective.stream(self.state.step)
        if name not in self.streams:
            raise KeyError(f"{type(self.objective).__name__} asked for batch stream {name!r}; this Trainer has "
                           f"{sorted(self.streams)}")
        batches = self.streams[name]
        for _ in range(self.cfg.train.grad_accum):
            loss, metrics = self.objective(self.engine, batches.next().to(self.device), self.state.step)
            self._watch_finite(loss.detach(), batches)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                v = torch.as_tensor(v).detach()
                sums[k] = sums[k] + v if k in sums else v
        return {k: v / self.cfg.train.grad_accum for k, v in sums.items()}

    def _watch_finite(self, loss: torch.Tensor, batches: ShardedBatches) -> None:
        """Remember, on the device, the first micro-batch since the last check whose loss is not finite."""
        if self._bad_at is None:
            self._bad_at = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_at < 0)
        self._bad_at = torch.where(first, len(self._positions), self._bad_at)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)
        self._positions.append((self.state.step + 1, batches.epoch, batches.cursor))

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if any rank saw a non-finite loss since the last check (one host sync per check,
        none per micro-batch). The weights it touched are never evaluated, checkpointed or exported."""
        if self._bad_at is None:
            return
        at = int(self._bad_at.item())
        if dist.any_rank(at >= 0):
            latest = self.checkpointer.latest()
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"
            where = ("on another rank" if at < 0 else f"({self._bad_loss.item()}) at step {self._positions[at][0]} "
                     f"(micro-batch of epoch {self._positions[at][1]}, position {self._positions[at][2]})")
            raise NonFiniteLossError(f"non-finite loss {where}; nothing was saved since, {kept}. Lower optim.lr "
                                     "or check the data")
        self._bad_at, self._positions = None, []

    def evaluate(self) -> float | None:
        if not self.data.val_batches:
            return None
        self.engine.eval()
        total, count = eval_loss(self.engine, self.data.val_batches, len(self.tokenizer), self.device)
        self.engine.train()
        total, count = dist.all_reduce_sum([total, float(count)])
        return total / count

    # ---- run ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        self.checkpointer.clean_partial()
        latest = self.data.relaunch.checkpoint
        if latest is None:
            return
        self.state = self.checkpointer.load(self.engine, latest)
        overridden = self.data.relaunch.overridden
        if any(k.startswith("optim") for k in overridden):  # the optimizer's settings came back from the checkpoint
            reapply_optim(self.engine, self.cfg.optim)
        for name, stream in self.streams.items():
            if name in self.state.data:
                stream.load_state_dict(self.state.data[name])
        self.objective.load_state_dict(self.state.objective)
        if dist.is_main():
            print(f"resumed from {latest} (step {self.state.step})", flush=True)

    def save(self) -> None:
        self.state.data = {name: stream.state_dict() for name, stream in self.streams.items()}
        self.state.objective = self.objective.state_dict()
        record = {"config": launch_config(self.cfg), "inputs": self.data.inputs,
                  "history": self.data.relaunch.history}
        self.checkpointer.save(self.engine, self.state, record)

    def fit(self) -> dict[str, float | None]:
        """Train to train.max_steps (or an early stop), evaluating, logging and checkpointing at their cadences,
        then export; the run directory is given back however it ends."""
        try:
            start_step = self._begin()
            t = self.cfg.train
            mfu = self.flops_per_token / (t.peak_tflops * 1e12 * dist.world_size()) if t.peak_tflops else 0.0
            progress = StepReporter(self.run_dir, self.state.step, t.max_steps, self.tokens_per_step, mfu,
                                    enabled=dist.is_main())
            try:
                while self.state.step < t.max_steps and not self.state.stopped_early:
                    lr = self.engine.get_lr()[0]  # the LR this step uses (the scheduler advances inside step())
                    metrics = self.train_step()
                    self.state.step += 1
                    self.state.tokens_seen += self.tokens_per_step
                    progress.step_done()
                    self._after_step(metrics, lr, progress)
            finally:
                progress.close()
            self._finish(start_step)
            return {"step": self.state.step, "val_loss": self.state.last_val}
        finally:
            if dist.is_main():
                self.run.unlock()

    def _begin(self) -> int:
        """Resume, and say what this launch is: config.yaml once it will train (a finished run relaunched changes
        nothing, and an override there is refused). Returns the step it starts from."""
        if dist.is_main():
            clean_stale(self.run.final)  # an export killed mid-write
        self.resume()
        start, overridden = self.state.step, self.data.relaunch.overridden
        finished = start >= self.cfg.train.max_steps or self.state.stopped_early
        if finished and overridden:
            raise UserError(f"{self.run.name} finished at step {start}: checkpoint.allow_changes={overridden} "
                            "would change nothing it trains (the model was made with the old values), and the run "
                            "would then say otherwise; use another run_dir (model.pretrained= its final/ starts a new "
                            "run from this one)")
        if dist.is_main() and not finished:
            self.run.write_config(yaml.safe_dump(to_dict(self.cfg), sort_keys=False), self.ds_config)
            for line in self.data.relaunch.lines:
                print(line, flush=True)
        return start

    def _after_step(self, metrics: dict[str, torch.Tensor], lr: float, progress: StepReporter) -> None:
        """What the step just taken is due for: the finite check before anything reads or saves the weights, an
        evaluation (and the early stop it may decide), a log record, a checkpoint."""
        step, t = self.state.step, self.cfg.train
        last = step == t.max_steps
        evaluates = bool(t.eval_every and step % t.eval_every == 0) or last
        saves = bool(self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0)
        if evaluates or saves or step % t.log_every == 0:
            self.check_finite()
        record: dict[str, float | None] = {}
        if evaluates:
            self.state.last_val = record["val_loss"] = self.evaluate()
            if self._stop_early(self.state.last_val):
                record["early_stop"] = 1.0
                last = True
        if step % t.log_every == 0 or last or "val_loss" in record:
            gn = self.engine.get_global_grad_norm()
            progress.log(step, metrics, record, lr, self.state.tokens_seen, float(gn) if gn is not None else None,
                         self.state.last_val)
        if saves or last:
            self.save()

    def _finish(self, start_step: int) -> None:
        """Export what this launch trained; a finished run relaunched keeps its final/ as it is."""
        if self.state.step > start_step or not dist.on_main(self._final_is_current):
            self.export()
        elif dist.is_main():
            print(f"{self.run.name}: finished at step {self.state.step}; final/ is up to date, not exported again",
                  flush=True)

    def _final_is_current(self) -> bool:
        """final/ holds this run's export at its current step (a finished run relaunched as it was)."""
        final = self.run.final
        meta = ModelDir(final).meta() if (final / META).is_file() else None
        return (isinstance(meta, dict) and meta.get("step") == self.state.step
                and (final / MODEL_CONFIG).is_file() and any(final.glob("*.safetensors")))

    def _stop_early(self, val: float | None) -> bool:
        """train.patience: stop once the validation loss has not improved for that many evaluations in a row
        (the state is checkpointed, so a resumed run stops where it would have)."""
        if not self.cfg.train.patience or val is None:
            return False
        st = self.state
        if st.best_val is None or val < st.best_val:
            st.best_val, st.evals_since_best = val, 0
        else:
            st.evals_since_best += 1
        st.stopped_early = st.evals_since_best >= self.cfg.train.patience
        if st.stopped_early and dist.is_main():
            print(f"early stop at step {st.step}: validation loss {val:.4f} has not improved on {st.best_val:.4f} "
                  f"for {st.evals_since_best} evaluations (train.patience)", flush=True)
        return st.stopped_early

    def export(self) -> Path:
        """save_pretrained (safetensors) + tokenizer + run metadata into run_dir/final, atomically, on rank 0.
        The objective's heads are trained with the model but not exported."""
        final = self.run.final
        state_dict = None
        if self.cfg.train.zero_stage == 3:  # a collective: every rank calls it; rank 0 gets the full weights
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
            if state_dict is not None and isinstance(self.engine.module, ModelWithHeads):
                state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        if dist.is_main():
            with atomic_output_dir(final, MODEL_FILES, overwrite=True, field="run_dir/final") as tmp:
                write_model_dir(tmp, self.model, self.tokenizer, self.metadata(), state_dict)
        dist.barrier()
        return final

    def metadata(self) -> dict[str, Any]:
        """The exported run metadata; `stages` carries over from a pretrained start, for later stages to extend.
        It goes wherever the model goes (a hub push), so it names no absolute local path: input paths are relative
        to the run directory (`RunDir.resolve` reads them back) and identified by content in `inputs`."""
        start = ModelDir(self.cfg.model.pretrained).meta() if self.cfg.model.pretrained else None
        sources = [Path(s).name if Path(s).is_absolute() else s for s in self.manifest.get("sources", [])]
        run_config = relative_to_run(to_dict(self.cfg), self.data.inputs, self.run_dir)
        run_config["run_dir"] = str(Path(*self.run_dir.absolute().parts[-2:]))  # its name (and its parent's)
        return {"recipe": self.recipe, "run_config": run_config,
                "inputs": self.data.inputs, "history": self.data.relaunch.history,
                "data_manifest": {**self.manifest, "sources": sources}, "params": self.n_params,
                "step": self.state.step, "tokens_seen": self.state.tokens_seen,
                "stages": (start or {}).get("stages", [])}


def _check_model_fits(cfg: ModelConfig, data: PackedDataset) -> None:
    """The model reads the data's vocabulary and sequences of its seq_len (checked before any model is built)."""
    if cfg.pretrained:
        d = ModelDir.open(cfg.pretrained, "model.pretrained")
        d.check_vocabulary(data, "the model must be trained on the data's tokenizer")
        d.check_context(data.seq_len, "use data packed with a shorter pack.seq_len")
    elif cfg.max_position_embeddings < data.seq_len:
        raise UserError(f"model.max_position_embeddings={cfg.max_position_embeddings} is below the data's "
                        f"seq_len={data.seq_len} ({data.path}); raise it to at least {data.seq_len}")


def _model_config(cfg: ModelConfig, objective: Objective) -> ModelConfig:
    """The model section with the attention the objective needs: filled in for `auto`, an error otherwise."""
    need = objective.attn_implementation
    if need is None or cfg.attn_implementation == need:
        return cfg
    if cfg.attn_implementation != "auto":
        raise UserError(f"model.attn_implementation={cfg.attn_implementation}: {type(objective).__name__} needs "
                        f"{need}; set model.attn_implementation={need} (or auto)")
    return dataclasses.replace(cfg, attn_implementation=need)
