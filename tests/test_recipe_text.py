"""The one rendering of a run's recipe (slm_assist.recipes) that reports and model cards share: SALT's
schedule, its levers and the control, from the exported run config."""

from __future__ import annotations


def test_reports_and_cards_share_one_recipe_text():
    from slm_assist.core.config import load_config, to_dict
    from slm_assist.recipes import describe
    from slm_assist.salt.recipe import RunConfig

    def recipe(*overrides):
        return describe({"recipe": "salt", "run_config": to_dict(load_config(RunConfig, None, list(overrides)))}, ".")

    assert recipe().short == "CE" and recipe().lines == []
    control = recipe("distill.source.kind=label_smoothing", "distill.source.epsilon=0.3", "distill.schedule.n_kd_steps=5")
    assert control.short == "control: label smoothing ε=0.3, step w=0.667 for 5 steps" and control.tags == []
    assert "- control: label smoothing ε = 0.3" in control.lines
    assert "- schedule: step, w = 0.667, n_KD = 5 steps" in control.lines  # n_KD from the schedule's own rule
    salt = recipe("distill.source.kind=teacher", "distill.source.teachers=[runs/x/slm/final]", "train.max_steps=1000")
    assert salt.short == "SALT: KD from slm, step w=0.667 for 20% of steps" and salt.tags == ["salt", "distillation"]
    assert "- schedule: step, w = 0.667, n_KD = 200 steps" in salt.lines
    gentle = recipe("distill.source.kind=teacher", "distill.source.teachers=[runs/x/slm/final]", "train.max_steps=1000",
                    "distill.schedule.exit_fraction=0.1", "distill.schedule.exit_shape=cosine")
    assert "- schedule: step, w = 0.667, n_KD = 200 steps, then w decays to 0 over 100 steps (cosine)" in gentle.lines
    aligned = recipe("distill.source.kind=teacher", "distill.source.teachers=[runs/x/slm/final]",
                     "distill.align.weight=0.1", "distill.align.layer=2")
    assert ("- representation alignment (LET): student block 2 → the SLM's last hidden state (cosine), weight 0.1 "
            "decaying to 0 over 20% of steps") in aligned.lines
