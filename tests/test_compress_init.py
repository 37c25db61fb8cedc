"""Compression inits and latent stages made for a causal LM: projections from a pruned student's kept channels,
the last block matched in logit space, pruning's source, axes and calibration data, and the bad input of each."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from slm_assist.compress.init import calibration_rows
from slm_assist.compress.objective import CompressObjective, LossConfig
from slm_assist.compress.prune import importance, prune
from slm_assist.compress.stages import CompressConfig
from slm_assist.core.config import load_config
from slm_assist.core.dataset import PackedDataset, shared_span_share
from slm_assist.core.errors import ConfigError
from slm_assist.training.batches import Batch

from .conftest import error_line, run_module, run_overrides
from .test_compress import _llama


def _pruned_pair():
    teacher = _llama(2, 32, 4).requires_grad_(False)
    imp = importance(teacher, [torch.randint(0, 50, (2, 12)) for _ in range(2)])
    return teacher, prune(teacher, imp, hidden=16, layers=2, heads=2, kv_heads=2, ffn=32)


def test_kept_projections_start_as_the_pruning_and_the_last_block_in_logit_space_starts_as_kd():
    teacher, pruned = _pruned_pair()
    student = pruned.model.train()
    cfg = load_config(LossConfig, None, ["kd=1", "hidden=1", "last_layer=logits"])
    obj = CompressObjective(cfg, teacher, student.config, 50, default_map=pruned.blocks,
                            kept_channels=pruned.channels)
    (proj,) = obj.trainable_modules()
    expected = torch.zeros(32, 16)
    expected[pruned.channels, range(16)] = 1.0
    assert all(torch.equal(m.weight, expected) for m in proj.maps.values())
    ids = torch.randint(0, 50, (2, 9))
    loss, m = obj(student, Batch(ids), step=0)
    # the student's head is the teacher's sliced to the kept channels: through the kept projection, the teacher's
    # head reads the student's final state as the student's own head does, so the logit-space term is the KD term
    assert m["head"].item() == pytest.approx(m["kd"].item(), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(m["kd"].item() + m["hidden"].item() + m["head"].item(), rel=1e-5)
    loss.backward()
    assert proj.maps["2"].weight.grad is not None and proj.maps["2"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    state = CompressObjective(load_config(LossConfig, None, ["hidden=1"]), teacher, student.config, 50,
                              kept_channels=pruned.channels)
    _, m = state(student, Batch(ids), step=0)
    assert "head" not in m and "hidden" in m  # last_layer=state: every mapped layer by its hidden state
    random = CompressObjective(load_config(LossConfig, None, ["hidden=1", "projection_init=random"]), teacher,
                               student.config, 50, kept_channels=pruned.channels)
    assert not torch.equal(random.trainable_modules()[0].maps["1"].weight, expected)


def test_latent_settings_without_effect_are_rejected():
    with pytest.raises(ConfigError, match=r"last_layer='logits' has no effect with hidden=0"):
        load_config(LossConfig, None, ["kd=1", "last_layer=logits"])
    assert load_config(LossConfig, None, ["hidden=1", "last_layer=logits", "tau=2"]).tau == 2  # tau feeds it
    with pytest.raises(ConfigError, match=r"tau=2.0 has no effect with kd=0 \(and no last_layer=logits\)"):
        load_config(LossConfig, None, ["hidden=1", "tau=2"])


def test_init_source_axes_and_calibration_settings_are_checked_in_the_config():
    with pytest.raises(ConfigError, match=r"init\.source: finetuned, but no stage before the first student stage"):
        load_config(CompressConfig, None, ["task_data=x", "init.kind=prune", "init.source=finetuned",
                                           "stages=[{name: gd}]"])
    ok = load_config(CompressConfig, None, ["task_data=x", "init.kind=prune", "init.source=finetuned"])
    assert ok.stages[0].trains == "teacher"  # the default list fine-tunes the teacher first
    with pytest.raises(ConfigError, match=r"init\.calibration_data: task, but task_data is empty"):
        load_config(CompressConfig, None, ["init.kind=prune", "init.calibration_data=task", "stages=[{name: gd}]"])
    with pytest.raises(ConfigError, match=r"init\.axes='width' has no effect with init\.kind=layers"):
        load_config(CompressConfig, None, ["task_data=x", "init.kind=layers", "init.axes=width"])
    with pytest.raises(ConfigError, match=r"init\.source='finetuned' has no effect with init\.kind=random"):
        load_config(CompressConfig, None, ["task_data=x", "init.source=finetuned"])


def _config(tmp_path) -> str:
    (tmp_path / "compress.yaml").write_text("seed: 0\n")
    return str(tmp_path / "compress.yaml")


def _args(tmp_path, tiny_data, teacher, *extra):
    return [_config(tmp_path), f"run_dir={tmp_path / 'run'}", f"teacher={teacher}", f"general_data={tiny_data}", "init.kind=prune",
            "init.calibration=8", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=1",
            "model.ffn_size=32", "stages=[{name: gd, max_steps: 1}]", "train.dtype=fp32", "train.torch_threads=1",
            "train.micro_batch_size=4", "train.eval_batches=1", "checkpoint.every=0", *extra]


@pytest.mark.parametrize("extra, message", [
    (["init.axes=width"], r"init\.axes=width: model\.num_layers=1 changes the depth \(the source has 2\); set "
                          r"model\.num_layers=2, or init\.axes=both"),
    (["init.axes=depth"], r"init\.axes=depth: model\.hidden_size=16 changes the width \(the source has 32\)"),
    (["init.source=/nonexistent/model"], r"init\.source=/nonexistent/model: not a save_pretrained model directory"),
    (["model.ffn_size=65"], r"model\.ffn_size=65 must be in 1\.\.64 \(the teacher's\)"),
    (["model.num_heads=4"], r"model\.num_heads=4 must be in 1\.\.2"),
    (["model.num_heads=3"], r"model\.hidden_size: expected a multiple of num_heads=3, got 16"),
])
def test_bad_pruning_requests_fail_before_any_step(extra, message, tiny_data, tiny_slm, tmp_path):
    res = run_module("slm_assist.compress", _args(tmp_path, tiny_data, tiny_slm, *extra))
    assert res.returncode == 2 and re.search(message, error_line(res.stderr)), res.stderr[-2000:]
    assert not (tmp_path / "run" / "init").exists()


def test_overlapping_task_and_general_data_are_measured_and_warned(tiny_data, tiny_task, tiny_slm, tmp_path, capsys):
    from slm_assist.compress import stages
    from slm_assist.core.model_dir import ModelDir

    general, task = PackedDataset.open(tiny_data), PackedDataset.open(tiny_task)
    assert shared_span_share(general, general) == (1.0, 1.0)
    share, searched = shared_span_share(task, general)
    assert share < 0.01 and searched == 1.0  # Perl docs are not in the tiny corpus
    half, searched = shared_span_share(general, general, max_tokens=sum(general.manifest["splits"][s]["tokens"]
                                                                        for s in ("train", "validation")) // 2)
    assert half == 1.0 and 0.45 < searched < 0.55  # evenly spaced rows: the same half of each
    cfg = load_config(CompressConfig, None, _args(tmp_path, tiny_data, tiny_slm, f"task_data={tiny_data}")[1:])
    stages._check_plan(cfg, {"general": general, "task": general}, [ModelDir(tiny_slm)])
    out = capsys.readouterr().out
    assert f"warning: task_data={tiny_data}: 100.0% of its 16-token spans also occur in general_data" in out
    stages._check_plan(cfg, {"general": general, "task": task}, [ModelDir(tiny_slm)])
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_default_latent_stage_leaves_a_pruned_students_task_loss_no_worse(tiny_data, tiny_task, tmp_path):
    """The issue-25 property: from a pruned init, one default latent stage on general data does not cost the
    student task quality (ERNIE-Tiny's hidden-state-only stages did: the output head was left behind)."""
    from slm_assist.eval import dataset_loss, load_model

    teacher = tmp_path / "teacher"
    res = run_module("slm_assist.train", run_overrides(tiny_data, teacher, "train.max_steps=60", "train.eval_every=0",
                                                       "optim.lr=3e-3", "train.dtype=fp32", "checkpoint.every=0"))
    assert res.returncode == 0, res.stderr[-2000:]
    args = ["init.kind=prune", "init.calibration=32", "model.hidden_size=16", "model.num_layers=1",
            "model.num_heads=1", "model.ffn_size=32", "stages=[{name: gd, max_steps: 30}]", "train.eval_every=0"]
    res = run_module("slm_assist.compress", [_config(tmp_path), f"run_dir={tmp_path / 'c'}", f"teacher={teacher / 'final'}",
                                             f"general_data={tiny_data}", f"task_data={tiny_task}", *args,
                                             "train.dtype=fp32", "train.torch_threads=1", "train.micro_batch_size=8",
                                             "train.eval_batches=1", "checkpoint.every=0"])
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((tmp_path / "c" / "gd" / "final" / "slm_assist.json").read_text())["stages"][0]["config"]
    assert cfg["loss"]["kd"] > 0 and cfg["loss"]["last_layer"] == "logits"  # the default latent stage ran
    losses = {}
    for name in ("init", "gd/final"):
        model, tok = load_model(tmp_path / "c" / name, torch.device("cpu"))
        losses[name] = dataset_loss(model, tok, tiny_task)["loss"]
    assert losses["gd/final"] <= losses["init"], losses


@pytest.mark.slow
def test_pruning_from_the_teacher_a_stage_fine_tuned_on_task_calibration(tiny_data, tiny_task, tiny_slm, tmp_path):
    """Minitron's teacher correction: the init is made after the fine-tune stage, cut from its output, and its
    importance measured on the task data; the init's record says which teacher it came from (by content)."""
    from safetensors.torch import load_file

    from slm_assist.core.model_dir import ModelDir

    stages = ("stages=[{name: finetune, trains: teacher, teacher: none, data: task, loss: {ce: 1.0}, max_steps: 3},"
              " {name: gd, max_steps: 1}]")
    res = run_module("slm_assist.compress", _args(tmp_path, tiny_data, tiny_slm, f"task_data={tiny_task}",
                                                  "init.source=finetuned", "init.calibration_data=task", stages))
    assert res.returncode == 0, res.stderr[-2000:]
    finetuned = tmp_path / "run" / "finetune" / "final"
    record = json.loads((tmp_path / "run" / "init" / "slm_assist_init.json").read_text())
    assert record["identity"]["teacher"] == ModelDir(finetuned).fingerprint() != ModelDir(tiny_slm).fingerprint()
    init = load_file(str(tmp_path / "run" / "init" / "model.safetensors"))
    teacher = load_file(str(finetuned / "model.safetensors"))
    channels = record["teacher_channels"]
    assert len(channels) == 16 and torch.equal(init["model.embed_tokens.weight"],
                                               teacher["model.embed_tokens.weight"][:, channels])
    assert (tmp_path / "run" / "gd" / "final" / "model.safetensors").is_file()
    # the kept channels are the fine-tuned teacher's most important on the task's first 8 training sequences
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(finetuned)).eval()
    rows = PackedDataset.open(tiny_task).split("train")
    picked = calibration_rows(len(rows), 8, seed=0)
    assert picked != list(range(8)) and picked != calibration_rows(len(rows), 8, seed=1)  # seeds differ in it
    imp = importance(model, [torch.as_tensor(np.asarray(rows.select(picked)["input_ids"]), dtype=torch.long)])
    assert channels == imp.channels.topk(16).indices.sort().values.tolist()


@pytest.mark.slow
def test_a_general_student_keeps_its_origin_for_the_next_compress_run(tiny_data, tiny_task, tiny_slm, tmp_path):
    """ERNIE-Tiny's amortised general distillation: one compress run makes the general student, each task's run
    starts from it (init.kind=model) and still maps its blocks and channels onto the teacher they came from."""
    res = run_module("slm_assist.compress", _args(tmp_path, tiny_data, tiny_slm))
    assert res.returncode == 0, res.stderr[-2000:]
    general = tmp_path / "run" / "gd" / "final"
    made = json.loads((tmp_path / "run" / "init" / "slm_assist_init.json").read_text())
    carried = json.loads((general / "slm_assist.json").read_text())["stages"][-1]["origin"]
    assert carried == {k: made[k] for k in carried} and len(carried["teacher_channels"]) == 16
    task_run = [_config(tmp_path), f"run_dir={tmp_path / 'task'}", f"teacher={tiny_slm}", f"general_data={tiny_data}",
                f"task_data={tiny_task}", "init.kind=model", f"init.path={general}", "train.dtype=fp32",
                "train.torch_threads=1", "train.micro_batch_size=4", "train.eval_batches=1", "checkpoint.every=0",
                f"finetuned_teacher={tiny_slm}", "stages=[{name: tad, teacher: finetuned, data: task, max_steps: 1}]"]
    res = run_module("slm_assist.compress", task_run)
    assert res.returncode == 0, res.stderr[-2000:]
    inherited = json.loads((tmp_path / "task" / "init" / "slm_assist_init.json").read_text())
    assert {k: inherited[k] for k in carried} == carried
    # under another teacher the blocks and channels mean nothing: the origin is dropped
    other = tmp_path / "other_teacher"
    import shutil

    shutil.copytree(tiny_slm, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    res = run_module("slm_assist.compress", [a.replace(str(tiny_slm), str(other)).replace("/task", "/task2")
                                             if a.startswith(("teacher=", "finetuned_teacher=", "run_dir=")) else a
                                             for a in task_run])
    assert res.returncode == 0, res.stderr[-2000:]
    dropped = json.loads((tmp_path / "task2" / "init" / "slm_assist_init.json").read_text())
    assert dropped["teacher_channels"] is None and dropped["cut_from"] is None
