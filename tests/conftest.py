"""Shared fixtures: a tiny packed dataset and tiny model overrides, so every trainer test runs in seconds."""

from __future__ import annotations

import json
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
def tiny_corpus(tmp_path_factory) -> Path:
    """60 demo-corpus documents cut to 1,500 characters each (jsonl): ~900 sequences of 32 tokens."""
    from data_tools.corpus import CorpusConfig, read_documents

    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    docs = read_documents(CorpusConfig(max_docs=60))
    path.write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tiny_data(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus with a 400-piece BPE tokenizer, seq_len 32, 10% of documents held out."""
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = load_config(PrepareConfig, None, [
        f"out_dir={out}", f"corpus.paths=[{tiny_corpus}]", "tokenizer.vocab_size=400", "pack.seq_len=32",
        "pack.val_fraction=0.1",
    ])
    prepare(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_task(tiny_data, tmp_path_factory) -> Path:
    """A task unlike the tiny corpus (the demo's Perl docs, 60 documents of 1,500 characters) packed with the tiny
    data's tokenizer: the compression tests' task data."""
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    out = tmp_path_factory.mktemp("data") / "task"
    cfg = load_config(PrepareConfig, None, [
        f"out_dir={out}", f"corpus.paths=[{REPO / 'data_tools/demo_corpus/perldoc_task.jsonl.gz'}]",
        "corpus.max_docs=60", f"tokenizer.path={tiny_data / 'tokenizer'}", "pack.seq_len=32", "pack.val_fraction=0.2",
    ])
    prepare(cfg)
    return out


def run_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "configs/demo/llm.yaml"), f"data.path={data}", f"run_dir={run_dir}", *TINY_MODEL,
        "train.micro_batch_size=4", "train.eval_every=4", "train.eval_batches=2", "train.log_every=1",
        "schedule.warmup_steps=2", "train.torch_threads=1", *extra,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: without the rendezvous variables that in-process trainer tests set
    (a child must choose its own port), and without the outer make's state (`make test` runs the suite, and a
    nested make would print its directory changes)."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
            # make exports variables given on its command line (`make test ARGS=...`): the Makefile's own knobs
            "ARGS", "CONFIG", "NUM_GPUS", "NNODES", "HOSTFILE", "LAUNCHER", "DRY_RUN", "RUN", "REPO", "MODEL", "DATA",
            "DEMO", "DEMO_ARGS", "DEMO_PACK_ARGS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1", **extra}


def run_module(module: str, args: list[str], env: dict | None = None, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m module args` in a fresh process (for kills, launchers and exit codes)."""
    full_env = clean_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed CLI's stderr (exit 2): no traceback, nothing else but Python warnings
    (and their indented source lines)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line[0].isspace()
             and "Warning:" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="session")
def tiny_slm(tiny_data, tmp_path_factory) -> Path:
    """A random-init tiny Llama saved with the tiny dataset's tokenizer (a scoring model)."""
    import torch

    from slm_assist.core.config import load_config
    from slm_assist.core.tokenizer import load_tokenizer
    from slm_assist.training.models import ModelConfig, build_model

    tok = load_tokenizer(tiny_data / "tokenizer")
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, None, [o.removeprefix("model.") for o in TINY_MODEL])
    model = build_model(cfg, tok, torch.device("cpu"))
    out = tmp_path_factory.mktemp("models") / "slm"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def slm_other_tokenizer(tiny_slm, tmp_path_factory) -> Path:
    """tiny_slm's weights saved next to a tokenizer trained on unrelated text (a vocabulary mismatch)."""
    import shutil

    from data_tools.tokenizer_training import TokenizerConfig, train_sentencepiece

    root = tmp_path_factory.mktemp("other")
    other = root / "other"
    shutil.copytree(tiny_slm, other)
    train_sentencepiece(["an unrelated corpus makes an unrelated vocabulary " * 30], TokenizerConfig(vocab_size=300),
                        root / "tok")
    for f in (root / "tok").iterdir():
        shutil.copy(f, other / f.name)
    return other


def load_bench(name: str):
    """A bench/ script imported as a module (bench scripts are not a package), for tests of its plan and figures."""
    import importlib.util

    bench_dir = str((REPO / "bench" / name).parent)
    if bench_dir not in sys.path:  # as `python bench/X.py` has it: a script imports its sibling modules
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location(f"bench_{name.replace('/', '_')}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
