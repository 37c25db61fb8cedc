"""Operations: the launch commands documented in the README are exactly what `make ... DRY_RUN=1` prints, and the
two-process CPU runs through the make targets complete."""

from __future__ import annotations

import os
import re
import stat
import subprocess

import pytest

from slm_assist.core.dist import _free_port

from .conftest import REPO, TINY_MODEL, clean_env


def documented_commands() -> list[tuple[str, str]]:
    """(command, expected output) pairs from the README's `console` blocks."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    pairs = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.strip("\n").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                pairs.append((line[2:], lines[i + 1]))
    return pairs


@pytest.fixture()
def fake_scontrol(tmp_path):
    """`scontrol show hostnames A,B` prints one host per line, as SLURM's does for a plain list."""
    path = tmp_path / "scontrol"
    path.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def test_readme_documents_every_launch_target():
    cmds = " ".join(c for c, _ in documented_commands())
    for target in ("make pretrain ", "make pretrain-multinode", "make pretrain-slurm", "make score ",
                   "make score-multinode", "make score-slurm", "launch.sbatch"):
        assert target in cmds, target


@pytest.mark.parametrize("command,expected", documented_commands())
def test_dry_run_prints_the_documented_command(command, expected, fake_scontrol):
    env = clean_env(PATH=f"{fake_scontrol}:{os.environ['PATH']}")
    res = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == expected


def test_make_targets_name_a_missing_variable():
    res = subprocess.run(["make", "-s", "pretrain", "DRY_RUN=1"], cwd=REPO, capture_output=True, text=True,
                         env=clean_env())
    assert res.returncode != 0 and "pretrain: set CONFIG=" in res.stderr
    res = subprocess.run(["make", "-s", "push", "RUN=x", "DRY_RUN=1"], cwd=REPO, capture_output=True, text=True,
                         env=clean_env())
    assert res.returncode != 0 and "push: set REPO=" in res.stderr


def test_sbatch_script_outside_slurm_fails_clearly():
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", "configs/slurm/launch.sbatch", "slm_assist.train", "c.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "SLURM_NNODES is unset" in res.stderr


@pytest.mark.slow
def test_two_process_pretrain_and_score_through_make(tiny_data, tiny_slm, tmp_path):
    """NUM_GPUS=2 on a CPU machine: the deepspeed launcher starts two CPU processes (gloo)."""
    from slm_assist.core.run_dir import read_metrics

    run = tmp_path / "run"
    args = " ".join([f"data.path={tiny_data}", f"run_dir={run}", *TINY_MODEL, "train.max_steps=4",
                     "train.micro_batch_size=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
                     "checkpoint.every=0", "train.zero_stage=2", "train.torch_threads=1"])
    env = clean_env()
    res = subprocess.run(["make", "-s", "pretrain", "CONFIG=configs/demo/llm.yaml", "NUM_GPUS=2",
                          f"ARGS={args}", f"MASTER_PORT={_free_port()}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world=2" in res.stdout
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert (run / "final" / "model.safetensors").is_file()

    scores = tmp_path / "scores"
    res = subprocess.run(["make", "-s", "score", "NUM_GPUS=2", "CONFIG=configs/demo/score.yaml",
                          f"ARGS=model={tiny_slm} data={tiny_data} out_dir={scores} num_shards=4 torch_threads=1",
                          f"MASTER_PORT={_free_port()}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import datasets

    ds = datasets.load_from_disk(str(scores / "scores"))
    assert sorted(ds["index"]) == list(range(len(ds))) and len(ds) > 0
