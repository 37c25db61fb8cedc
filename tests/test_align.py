"""Issue 26's levers: representation alignment (LET-style) against its definition, in the objective and in a run
(one process and ZeRO-3 on two), and the settings it cannot mean."""

from __future__ import annotations

import pytest
import torch

from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.run_dir import read_metrics
from slm_assist.kd.latent import hidden_loss
from slm_assist.kd.losses import mixed_ce_kd
from slm_assist.kd.sources import OnlineTeacher
from slm_assist.salt.objective import AlignConfig, DistillConfig, SALTObjective
from slm_assist.training.batches import Batch

from .conftest import run_module, run_overrides
from .test_compress import _llama

TEACHER = ["source.kind=teacher", "source.teachers=[t]"]


def test_align_settings_refuse_what_they_cannot_mean():
    with pytest.raises(ConfigError, match=r"align\.weight: expected 0 unless one SLM runs online .*a cache stores no "
                                          r"hidden states"):
        load_config(DistillConfig, None, ["source.kind=cache", "source.caches=[c]", "align.weight=0.1"])
    with pytest.raises(ConfigError, match=r"align\.weight: expected 0 unless one SLM runs online"):
        load_config(DistillConfig, None, ["source.kind=teacher", "source.teachers=[a, b]", "align.weight=0.1"])
    with pytest.raises(ConfigError, match=r"align\.weight: expected 0 with loss\.fused_linear"):
        load_config(DistillConfig, None, [*TEACHER, "loss.fused_linear=true", "align.weight=0.1"])
    with pytest.raises(ConfigError, match=r"align\.layer=2 has no effect with weight=0"):
        load_config(DistillConfig, None, [*TEACHER, "align.layer=2"])
    with pytest.raises(ConfigError, match=r"align\.fraction: expected in \(0, 1\], got 0\.0"):
        load_config(DistillConfig, None, [*TEACHER, "align.weight=0.1", "align.fraction=0"])
    cfg = AlignConfig(weight=0.1, fraction=0.25)  # 25 of 100 steps: 0.1 at step 0, 0.05 at 12.5, 0 from 25 on
    assert [cfg.weight_at(s, 100) for s in (0, 10, 25, 60)] == pytest.approx([0.1, 0.06, 0.0, 0.0])


def test_the_alignment_term_is_its_definition_and_trains_its_projection():
    teacher, student = _llama(2, 16, 2).requires_grad_(False), _llama(3, 32, 2, seed=1).train()
    cfg = load_config(DistillConfig, None, [*TEACHER, "schedule.n_kd_steps=2", "align.weight=0.1",
                                            "align.layer=1", "align.fraction=0.4"])
    obj = SALTObjective(cfg, OnlineTeacher(teacher), 50, total_steps=10, teacher=teacher, student_shape=(32, 3))
    (proj,) = obj.trainable_modules()
    ids = torch.randint(0, 50, (2, 9))
    loss, m = obj(student, Batch(ids), step=1)  # KD phase, alignment weight 0.1 · (1 - 1/4)
    with torch.no_grad():
        s_out = student(input_ids=ids, output_hidden_states=True)
        t_out = teacher(input_ids=ids, output_hidden_states=True)
        h = hidden_loss(proj(1, s_out.hidden_states[1]), t_out.hidden_states[-1], "cosine")
        from slm_assist.kd.losses import SoftTargets

        mixed, _ = mixed_ce_kd(s_out.logits[:, :-1], ids[:, 1:], 0.667, SoftTargets(logits=t_out.logits[:, :-1]))
    assert m["align_w"].item() == pytest.approx(0.075) and m["align"].item() == pytest.approx(h.item(), rel=1e-5)
    assert loss.item() == pytest.approx(mixed.item() + 0.075 * h.item(), rel=1e-5)
    loss.backward()
    assert proj.maps["1"].weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    # after the KD phase the alignment still runs (CE + a·h); once its weight is 0 the step is plain CE
    _, m = obj(student, Batch(ids), step=3)
    assert "kd" not in m and m["align_w"].item() == pytest.approx(0.025)
    _, m = obj(student, Batch(ids), step=4)
    assert "align" not in m and "kd" not in m
    with pytest.raises(UserError, match=r"distill\.align\.layer=4: the student has 3 blocks"):
        bad = load_config(DistillConfig, None, [*TEACHER, "align.weight=0.1", "align.layer=4"])
        SALTObjective(bad, OnlineTeacher(teacher), 50, 10, teacher=teacher, student_shape=(32, 3))


ALIGN = ["distill.source.kind=teacher", "distill.schedule.n_kd_steps=3", "distill.align.weight=0.1",
         "distill.align.fraction=0.5", "model.hidden_size=48", "model.num_heads=2"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_a_run_with_alignment_logs_it_and_checkpoints_the_projection(zero, tiny_data, tiny_slm, tmp_path):
    """The student (48 wide) aligned to the tiny SLM (32 wide) through a trained projection, one process at ZeRO 0
    and two at ZeRO-3."""
    from slm_assist.training.checkpoint import read_deepspeed_file

    run = tmp_path / f"z{zero}"
    args = run_overrides(tiny_data, run, *ALIGN, f"distill.source.teachers=[{tiny_slm}]", "train.max_steps=8",
                         "checkpoint.every=4", f"train.zero_stage={zero}", "train.micro_batch_size=2")
    launcher = ["torch.distributed.run", ["--nproc_per_node", "2", "-m", "slm_assist.train", *args]] if zero else \
        ["slm_assist.train", args]
    res = run_module(*launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_metrics(run)
    assert [round(r.get("align_w", 0.0), 6) for r in recs] == [0.1, 0.075, 0.05, 0.025, 0, 0, 0, 0]
    assert all(0 < r["align"] < 2 for r in recs[:4]) and all("align" not in r for r in recs[4:])
    assert [r["kd_phase"] for r in recs] == [1.0] * 3 + [0.0] * 5
    states = sorted((run / "checkpoints" / "step_00000004").glob("*model_states.pt"))
    heads = {k: v for k, v in read_deepspeed_file(states[0])["module"].items() if k.startswith("heads.")}
    assert heads, "the projection is checkpointed with the model"
