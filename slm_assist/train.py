"""`python -m slm_assist.train CONFIG [key=value ...]`: pretrain a causal LM with DeepSpeed, with SALT when the
config has a `distill` teacher, cache or label smoothing (slm_assist/salt), plain CE otherwise.

Runs as a plain process, under `torchrun`, or under the `deepspeed` launcher. Resumes from the newest complete
checkpoint in run_dir; exports the final model with `save_pretrained` to run_dir/final.
"""

from __future__ import annotations

from collections.abc import Sequence

from slm_assist.core import dist
from slm_assist.core.config import parse_cli
from slm_assist.core.errors import run_cli
from slm_assist.salt.recipe import RunConfig, build_trainer

USAGE = "python -m slm_assist.train CONFIG [key=value ...]"


def main(argv: Sequence[str]) -> dict:
    cfg = parse_cli(argv, RunConfig, USAGE, description=__doc__,
                    example="python -m slm_assist.train configs/demo/llm.yaml train.max_steps=50 run_dir=runs/x")
    trainer = build_trainer(cfg)
    if dist.is_main():
        print(f"model: {trainer.n_params / 1e6:.2f}M params, {cfg.model.model_type}, "
              f"attn={trainer.model.config._attn_implementation}, dtype={cfg.train.dtype}, "
              f"zero={cfg.train.zero_stage}, world={dist.world_size()}", flush=True)
    result = trainer.fit()
    if dist.is_main():
        print(f"done: step {result['step']}, val_loss {result['val_loss']}, model in {trainer.run_dir / 'final'}")
    return result


if __name__ == "__main__":
    run_cli(main)
