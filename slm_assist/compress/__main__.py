"""`python -m slm_assist.compress CONFIG [key=value ...]`: compress a pretrained LLM into a small student by
progressive distillation (stages in the config; default ERNIE-Tiny's finetune -> GD -> GED -> TAD -> TSD).

Every stage is an ordinary run directory under run_dir (metrics, checkpoints, final/); a relaunch skips finished
stages and resumes the unfinished one. Runs as a plain process, under torchrun or the deepspeed launcher.
"""

from __future__ import annotations

from collections.abc import Sequence

from slm_assist.compress.stages import CompressConfig, run
from slm_assist.core import dist
from slm_assist.core.config import parse_cli
from slm_assist.core.errors import run_cli

USAGE = "python -m slm_assist.compress CONFIG [key=value ...]"


def main(argv: Sequence[str]) -> None:
    cfg = parse_cli(argv, CompressConfig, USAGE, description=__doc__,
                    example="python -m slm_assist.compress configs/demo/compress.yaml init.kind=layers")
    student = run(cfg)
    if dist.is_main():
        print(f"done: the compressed student is {student}")


if __name__ == "__main__":
    run_cli(main)
