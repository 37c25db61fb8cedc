"""Shared fixtures: a tiny packed dataset and tiny model overrides, so every trainer test runs in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A debug model: ~60k params, trains a step in milliseconds on CPU.
TINY_MODEL = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=64",
    "model.max_position_embeddings=64", "model.pad_vocab_to=1",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The first 40 demo-corpus documents, a 400-piece BPE tokenizer, seq_len 32."""
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.config import load_config

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = load_config(PrepareConfig, None, [
        f"out_dir={out}", "corpus.max_docs=40", "tokenizer.vocab_size=400", "pack.seq_len=32",
        "pack.val_fraction=0.1",
    ])
    prepare(cfg)
    return out


def run_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "configs/demo/llm.yaml"), f"data.path={data}", f"run_dir={run_dir}", *TINY_MODEL,
        "train.micro_batch_size=4", "train.eval_every=4", "train.eval_batches=2", "train.log_every=1",
        "schedule.warmup_steps=2", "train.torch_threads=1", *extra,
    ]


def run_module(module: str, args: list[str], env: dict | None = None, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m module args` in a fresh process (for kills, launchers and exit codes)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # let the child choose
        full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kw)
