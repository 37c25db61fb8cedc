"""The one place that calls `deepspeed.initialize`. Its JSON config is derived from the typed run config."""

from __future__ import annotations

from typing import Any

import torch

from slm_assist.training.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_factor, param_groups


class ModelWithHeads(torch.nn.Module):
    """The model plus an objective's trainable modules (e.g. projections) as the one module DeepSpeed wraps, so
    they are cast, all-reduced, optimised and checkpointed with it. Calls go to the model; export saves `.model`.
    Used only when an objective has such modules: a plain model keeps its checkpoint layout."""

    def __init__(self, model: torch.nn.Module, heads: list[torch.nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleList(heads)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def deepspeed_config(*, micro_batch: int, grad_accum: int, world: int, dtype: str, zero_stage: int,
                     grad_clip: float) -> dict[str, Any]:
    """DeepSpeed settings from the run config; nothing here is maintained by hand elsewhere."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers full weights on rank 0
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW on CPU
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
        # we time steps ourselves; DeepSpeed's throughput timer would sync the device at every forward and step
        "timers": {"throughput": {"enabled": False}},
    }


def initialize(model: torch.nn.Module, ds_config: dict[str, Any], optim: OptimConfig, schedule: ScheduleConfig,
               total_steps: int, device: torch.device):
    """Wrap the model: optimizer (AdamW), LR schedule (a LambdaLR DeepSpeed steps and checkpoints), engine."""
    import deepspeed

    optimizer = build_optimizer(param_groups(model, optim.weight_decay), optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def reapply_optim(engine, optim: OptimConfig) -> None:
    """After a resume with checkpoint.allow_changes on `optim`: the checkpoint restored the old peak LR into the
    scheduler and the old betas, eps and weight decay into the optimizer; put the config's values back (the no-decay
    group, second in `param_groups`, keeps weight decay 0), at the schedule's current point."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    for i, (group, factor) in enumerate(zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas)):
        group["betas"], group["eps"], group["initial_lr"] = (optim.beta1, optim.beta2), optim.eps, optim.lr
        if i == 0:  # param_groups' order: the decayed parameters first
            group["weight_decay"] = optim.weight_decay
        group["lr"] = optim.lr * factor(scheduler.last_epoch)
