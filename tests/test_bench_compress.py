"""The compression benchmark's plan and derived figures: every arm spends the same student budget with a valid
stage list, and the gap, standard errors and z-scores are computed as RESULTS.md states them."""

from __future__ import annotations

import json

import pytest

from slm_assist.compress.stages import CompressConfig
from slm_assist.core.config import load_config

from .conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("compress")


def test_every_arm_spends_the_same_student_budget_with_a_valid_stage_list(bench):
    for p in bench.PROFILES.values():
        for arm in bench.MAIN_ARMS:
            plan = bench.stages(arm, p)
            assert sum(s["max_steps"] for s in plan) == p["budget"], arm
            cfg = load_config(CompressConfig, None, ["task_data=t", "finetuned_teacher=ft", f"stages={json.dumps(plan)}"])
            assert [s.name for s in cfg.stages] == [s["name"] for s in plan]
    full = bench.PROFILES["full"]
    assert [s["teacher"] for s in bench.stages("progressive", full)] == ["pretrained", "finetuned", "finetuned",
                                                                          "finetuned"]
    assert bench.stages("progressive_logit", full)[0]["loss"] == {"kd": 1.0}
    assert bench.teacher_flops("scratch", full, 10) == 0.0
    assert bench.teacher_flops("tsd_only", full, 10) == 2.0 * 10 * full["budget"] * full["batch"] * full["seq"]


def test_gap_standard_errors_and_z(bench):
    p = bench.PROFILES["quick"]
    row = lambda loss: {"task_val_loss": loss, "cloze_acc": 0.1, "general_val_loss": 5.0, "params": 7}  # noqa: E731
    runs = {"scratch": {0: row(4.0), 1: row(4.2)}, "progressive": {0: row(3.5), 1: row(3.7)},
            "tsd_only": {0: row(3.9), 1: row(4.1)}, "init_slm": {0: row(3.6)}}
    arms = bench.summarise(runs, {"task_val_loss": 3.0, "params": 10}, p,
                           {"scratch": "scratch", "progressive": "progressive", "tsd_only": "tsd_only",
                            "init_slm": "progressive"})
    prog = arms["progressive"]
    assert prog["task_val_loss_mean"] == pytest.approx(3.6) and prog["task_val_loss_se"] == pytest.approx(0.1)
    assert prog["gap_recovered_mean"] == pytest.approx(0.5 / 1.1)  # scratch mean 4.1, teacher 3.0
    assert arms["scratch"]["gap_recovered_mean"] == pytest.approx(0.0)
    assert bench._z(prog, arms["tsd_only"]) == pytest.approx(0.4 / (0.1 * 2 ** 0.5))
    assert arms["init_slm"]["pilot"] and arms["init_slm"]["task_val_loss_se"] is None
    assert bench._z(prog, arms["init_slm"]) is None  # one seed: no standard error, no claim
    assert arms["init_slm"]["teacher_flops"] == arms["progressive"]["teacher_flops"] > 0
