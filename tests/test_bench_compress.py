"""The compression benchmark's plan and figures (bench/compress.py, bench/compress_report.py): every run's config
is valid and every amortised arm spends the same task budget; the FLOPs it charges, the GD length that matches the
SLM, tokens to match, the charged gap, the Pareto front and the statistics, against hand-computed values."""

from __future__ import annotations

import json

import pytest
import yaml

from slm_assist.compress.stages import CompressConfig
from slm_assist.core.config import load_config

from .conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("compress")


@pytest.fixture(scope="module")
def report(bench):
    import compress_report  # bench/ is on sys.path once the bench is loaded

    return compress_report


def test_every_run_config_is_valid(bench, tmp_path):
    for p in bench.PROFILES.values():
        runs = [what for _, what, _ in bench.run_plan(p, 1, 1) if what[0] != "train"]
        assert {w[1] for w in runs if w[0] == "arm"} == set(bench.make_arms(p))
        for what in runs:
            cfg = bench.run_config(what, p, tmp_path)
            plan = cfg["stages"]
            # the stage list alone, as an override (the form the compress CLI documents) ...
            staged = load_config(CompressConfig, None, ["task_data=t", "finetuned_teacher=ft",
                                                        f"stages={json.dumps(plan)}"])
            assert [s.name for s in staged.stages] == [s["name"] for s in plan]
            # ... and the whole config the bench writes: init, model and data sections with it
            path = tmp_path / "run.yaml"
            path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), **cfg}))
            init = bench.make_arms(p)[what[1]].init if what[0] == "arm" else "prune"
            assert load_config(CompressConfig, path).init.kind == {"general": "model", "slm": "model"}.get(init, init)


def test_arms_spend_equal_task_budgets_and_stage_as_specified(bench):
    p = bench.PROFILES["full"]
    arms, b = bench.make_arms(p), p["budget"]
    for name, arm in arms.items():
        plan = bench.stages(arm, p)
        assert sum(s["max_steps"] for s in plan) == b * arm.multiple, name
    assert {a for a, arm in arms.items() if arm.group == "amortised"} == {
        "scratch", "tsd_only", "tad_tsd", "progressive", "gd_tsd", "slm"}
    prog = bench.stages(arms["progressive"], p)
    assert [(s["name"], s["teacher"], s["data"], s["max_steps"]) for s in prog] == [
        ("ged", "finetuned", "general", 75), ("tad", "finetuned", "task", 75), ("tsd", "finetuned", "task", 150)]
    assert prog[0]["loss"] == {"kd": 1.0, "hidden": 0.1, "last_layer": "logits"}  # the bench's main weight
    assert prog[2]["loss"] == {"ce": 1.0, "kd": 1.0}
    assert bench.stages(arms["progressive_h0"], p)[0]["loss"] == {"kd": 1.0}
    assert bench.stages(arms["tad_tsd_h1"], p)[0]["loss"]["hidden"] == 1.0
    assert [s["max_steps"] for s in bench.stages(arms["tad_tsd"], p)] == [150, 150]
    assert arms["gd_tsd_h0"].init == "general" and arms["gd_tsd_h0"].hidden == 0.0
    assert bench.stages(arms["scratch_x16"], p)[0]["max_steps"] == 16 * b
    assert arms["slm"].tasks == ("perl", "linux") and arms["single_stage"].tasks == ("perl",)


def test_parameter_counts_of_the_profiles_shapes(bench, report):
    p = bench.PROFILES["full"]
    params = {k: report.llama_params(s, 4096) for k, s in p["students"].items()}
    assert report.llama_params(p["teacher"], 4096) == 5_795_072  # counted on the built models
    assert params == {"fifth": 1_118_080, "width": 1_711_744, "depth": 1_839_872, "both": 1_676_736}


def test_gd_length_matches_the_slms_pretraining_flops(bench, report):
    p = bench.PROFILES["full"]
    n_s, n_t = 1_118_080, 5_795_072
    # SLM: 6·N_s·800 steps; a GD step: 6·N_s + 2·N_t, + 6·256·4096 with the logit-space term (hidden > 0)
    assert bench.general_plan(0.1, p)[0]["max_steps"] == round(800 * 6 * n_s / (6 * n_s + 2 * n_t + 6 * 256 * 4096)) == 218
    assert bench.general_plan(1.0, p)[0]["max_steps"] == 218
    assert bench.general_plan(0.0, p)[0]["max_steps"] == round(800 * 6 * n_s / (6 * n_s + 2 * n_t)) == 293
    c = report.costs(p)
    gd = report.run_flops(bench.general_plan(0.1, p), n_s, c, "prune")
    assert abs(gd["total"] - gd["calibration"] - report.slm_flops(c)) < 0.5 * (gd["total"] / 218)


def test_flop_totals_of_a_made_up_profile(report):
    c = report.Costs(n_teacher=100, d_teacher=4, vocab=10, tokens_per_step=2, calibration_tokens=3,
                     finetune_tokens=5, n_slm=20, slm_tokens=77)

    def st(steps, teacher, **loss):
        return {"max_steps": steps, "teacher": teacher, "loss": loss}

    tsd, lat = st(10, "finetuned", ce=1.0, kd=1.0), st(5, "finetuned", kd=1.0, hidden=0.1, last_layer="logits")
    assert report.run_flops([st(10, "none", ce=1.0)], 20, c, "random")["total"] == 6 * 20 * 20  # 2400
    # student 2400 + teacher 2·100·20 + calibration 2·100·3 + fine-tune 6·100·5
    assert report.run_flops([tsd], 20, c, "prune")["total"] == 2400 + 4000 + 600 + 3000
    # a latent stage of 5 steps (10 tokens): student 1200, teacher 2000, head 6·4·10·10; then TSD 5 steps
    half = dict(tsd, max_steps=5)
    f = report.run_flops([lat, half], 20, c, "prune")
    assert (f["head"], f["total"]) == (2400, 1200 + 2000 + 2400 + 1200 + 2000 + 600 + 3000)
    assert report.run_flops([tsd], 20, c, "slm")["total"] == 2400 + 4000 + 3000 + 6 * 20 * 77
    assert report.run_flops([tsd], 20, c, "model", general=5000)["total"] == 2400 + 4000 + 3000 + 5000
    # no fine-tuned teacher anywhere: no fine-tune charged, unless the student is pruned from it
    gd = st(4, "pretrained", kd=1.0)
    assert report.run_flops([gd], 20, c, "prune")["finetune"] == 0
    assert report.run_flops([gd], 20, c, "prune", source="finetuned")["finetune"] == 3000
    # GD steps: SLM 6·20·77 = 9240 FLOPs over a step's 240 + 400 (+ 480 head) FLOPs
    assert report.gd_steps({"kd": 1.0, "hidden": 0.1, "last_layer": "logits"}, 20, c) == 8  # 8.25
    assert report.gd_steps({"kd": 1.0}, 20, c) == 14  # 14.4


def test_bench_charges_each_arm(bench, report):
    p = bench.PROFILES["full"]
    arms, c = bench.make_arms(p), report.costs(p)
    tokens, n_s, n_t = 300 * 8 * 256, 1_118_080, 5_795_072
    assert bench.arm_flops(arms["scratch"], p)["total"] == 6 * n_s * tokens
    assert bench.arm_flops(arms["scratch_x4"], p)["total"] == 4 * 6 * n_s * tokens
    tsd = bench.arm_flops(arms["tsd_only"], p)
    assert tsd["total"] == 6 * n_s * tokens + 2 * n_t * tokens + 2 * n_t * 128 * 256 + 6 * n_t * 300 * 8 * 256
    gd_tsd = bench.arm_flops(arms["gd_tsd"], p)
    assert gd_tsd["general"] == bench.general_flops(0.1, p) and gd_tsd["calibration"] == 0
    assert bench.arm_flops(arms["slm"], p)["slm"] == report.slm_flops(c) == 6 * n_s * 800 * 8 * 256
    assert bench.arm_flops(arms["prune_width"], p)["student"] == 6 * 1_711_744 * tokens


def test_tokens_to_match_interpolates_in_log_tokens_on_the_running_minimum(report):
    m = [1, 2, 4, 8, 16]
    curve = [4.0, 3.8, 3.6, 3.5, 3.45]
    assert report.tokens_to_match(3.7, m, curve) == pytest.approx(2 ** 1.5)  # halfway from 2x to 4x in log
    assert report.tokens_to_match(3.6, m, curve) == pytest.approx(4.0)
    assert report.tokens_to_match(4.1, m, curve) == 1.0  # no better than 1x scratch
    assert report.tokens_to_match(3.4, m, curve) == ">16"
    overfit = [4.0, 3.6, 3.8, 3.5, 3.7]  # running minimum 4.0, 3.6, 3.6, 3.5, 3.5
    assert report.running_min(overfit) == [4.0, 3.6, 3.6, 3.5, 3.5]
    assert report.tokens_to_match(3.55, m, overfit) == pytest.approx(2 ** 2.5)  # not 2^2.83 on the raw curve
    assert report.tokens_to_match(3.49, m, overfit) == ">16"


def test_charged_gap_gives_scratch_the_arms_flops(report):
    flops, losses = [1e12 * k for k in (1, 2, 4, 8, 16)], [4.0, 3.8, 3.6, 3.5, 3.7]  # overfits at 16x
    g, clipped, ref = report.charged_gap(3.4, 1e12 * 2 ** 1.5, flops, losses, teacher=3.0)
    assert g == pytest.approx((3.7 - 3.4) / (3.7 - 3.0)) and not clipped  # scratch at 2.83x: 3.7
    assert ref == pytest.approx(3.7)
    g, clipped, ref = report.charged_gap(3.4, 32e12, flops, losses, teacher=3.0)
    assert g == pytest.approx((3.5 - 3.4) / (3.5 - 3.0)) and clipped  # past 16x: the running minimum there
    # scratch given the arm's FLOPs beats the teacher: no gap left, only the loss behind it
    g, _, ref = report.charged_gap(3.4, 8e12, flops, losses, teacher=3.55)
    assert g is None and ref == pytest.approx(3.5)


def test_pareto_front(report):
    pts = {"a": (1, 4.0), "f": (1, 4.2), "b": (2, 3.5), "e": (2, 3.9), "c": (3, 3.6), "d": (4, 3.0)}
    assert report.pareto_front(pts) == ["a", "b", "d"]


def test_docs_after_skips_what_the_general_data_holds(bench):
    docs = ["a" * 3, "b" * 3, "c" * 3, "d" * 3, "e" * 3]  # starts at 0, 3, 6, 9, 12
    assert bench.docs_after(docs, 5, 4) == ["ccc", "ddd"]
    assert bench.docs_after(docs, 0, 1) == ["aaa"]


def test_run_plan_starts_what_each_run_needs_first(bench):
    p = bench.PROFILES["full"]
    plan = bench.run_plan(p, 3, 3)
    seen = set()
    for name, _, deps in plan:
        assert set(deps) <= seen, name
        seen.add(name)
    names = [n for n, _, _ in plan]
    assert names[0] == "models/teacher" and len(names) == len(set(names))
    assert {f"general/h{h:g}_s{s}" for h in (0, 0.1, 1) for s in range(3)} | {f"models/slm_s{s}" for s in range(3)} <= seen
    assert sum(n.startswith("arms/perl/scratch_x16_") for n in names) == 2
    assert sum(n.startswith("arms/perl/scratch_x4_") for n in names) == 3
    assert sum(n.startswith("arms/linux/") for n in names) == 6 * 3
    progressive = next(d for n, _, d in plan if n == "arms/linux/progressive_s1")
    assert set(progressive) == {"models/teacher", "general/h0.1_s1", "models/ft_linux"}
    deps = {n: d for n, _, d in plan}
    assert deps["arms/perl/scratch_s0"] == ("models/teacher",)  # a compress run reads the teacher, even untaught
    assert deps["models/slm_s2"] == () and deps["arms/perl/slm_s2"][1] == "models/slm_s2"
    assert names[1:3] == ["models/ft_perl", "models/ft_linux"] and names[3] == "arms/perl/scratch_x16_s0"


def row(loss: float, params: int = 7) -> dict:
    return {"task_val_loss": loss, "cloze_acc": 0.1, "general_val_loss": 5.0, "params": params}


def test_statistics_gap_and_paired_z(report):
    runs = {"scratch": {0: row(4.0), 1: row(4.2)}, "progressive": {0: row(3.5), 1: row(3.7)},
            "tsd_only": {0: row(3.9), 1: row(4.2)}, "slm": {0: row(3.6)}}
    prog = report.arm_row(runs["progressive"], 4.1, 3.0)
    assert prog["task_val_loss_mean"] == pytest.approx(3.6) and prog["task_val_loss_se"] == pytest.approx(0.1)
    assert prog["gap_recovered_mean"] == pytest.approx(0.5 / 1.1)  # scratch mean 4.1, teacher 3.0
    assert report.arm_row(runs["scratch"], 4.1, 3.0)["gap_recovered_mean"] == pytest.approx(0.0)
    # tsd_only - progressive per seed: 0.4, 0.5; mean 0.45, s.e. 0.05
    assert report.z(runs, "progressive", "tsd_only") == pytest.approx(9.0)
    slm = report.arm_row(runs["slm"], 4.1, 3.0)
    assert slm["pilot"] and slm["task_val_loss_se"] is None
    assert report.z(runs, "progressive", "slm") is None  # one common seed: no claim
    assert report.z(runs, "progressive", "absent") is None


def test_latent_changes_and_speed_ratio(report):
    pts = {0: {"init": 5.0, "ged": 4.0, "tad": 4.5}, 1: {"init": 5.2, "ged": 4.4}}
    ch = report.latent_changes(pts)
    assert ch["ged"]["ce_change_mean"] == pytest.approx(-0.9) and ch["ged"]["ce_change_se"] == pytest.approx(0.1)
    assert ch["tad"] == {"ce_change_mean": pytest.approx(0.5), "ce_change_se": None, "n_seeds": 1}
    assert report.speed_ratio([2.0, 4.0], [1.0, 1.0]) == (3.0, 1.0)


def test_the_result_layout(bench, report, tmp_path):
    p = bench.PROFILES["quick"]
    arms = bench.make_arms(p)
    meta = {a: {"group": arm.group, "same_size": arm.student == "fifth", "base": arm.base,
                "flops": bench.arm_flops(arm, p)} for a, arm in arms.items()}
    seeds = lambda *losses: {s: row(x) for s, x in enumerate(losses)}  # noqa: E731
    perl = {"scratch": seeds(4.0, 4.2), "scratch_x2": seeds(3.9), "scratch_x4": seeds(3.7), "scratch_x8": seeds(3.6),
            "scratch_x16": seeds(3.65), "tsd_only": seeds(3.9, 4.2), "progressive": seeds(3.5, 3.7),
            "single_stage": seeds(3.8, 3.9), "tsd_only_random": seeds(4.0, 4.1), "prune_width": seeds(3.6, 3.6),
            "prune_depth": seeds(3.8, 3.9), "slm": seeds(3.2, 3.3)}
    runs = {"perl": perl, "linux": {"scratch": seeds(5.0, 5.2), "progressive": seeds(4.5, 4.6), "tsd_only": seeds(4.8, 4.7)}}
    teachers = {t: {"finetuned": row(3.0), "pretrained": row(5.5)} for t in runs}
    general = {"flops": {"0.1": 1e12}, "steps": {"0.1": 10}, "slm_pretrain_flops": 9e11, "default": "0.1"}
    latent = {"general_h0.1": {"perl": report.latent_changes({0: {"init": 6.0, "gd": 5.5}})}}
    r = report.build(runs, teachers, meta, [1, 2, 4, 8, 16], latent, general, None, p)
    assert r["best_arm"] == "slm" and r["progressive_vs_tsd_only_z"] == pytest.approx(9.0)
    assert r["latent_stage_ce_change"] == pytest.approx(-0.5)
    assert r["amortised"]["progressive_vs_tsd_only_z"]["perl"] == pytest.approx(9.0)
    assert set(r["amortised"]["arms"]["progressive"]) == {"perl", "linux"}
    assert r["amortised"]["arms"]["progressive"]["linux"]["gap_recovered_mean"] == pytest.approx((5.1 - 4.55) / 2.1)
    assert [c["running_min"] for c in r["scratch_curve"]] == [4.1, 3.9, 3.7, 3.6, 3.6]
    assert r["tokens_to_match"]["progressive"] == pytest.approx(8.0)  # its mean 3.6 is the 8x run's
    assert r["tokens_to_match"]["tsd_only"] == pytest.approx(2 ** 0.25)  # 4.05: a quarter from 1x (4.1) to 2x (3.9)
    assert r["tokens_to_match"]["slm"] == ">16" and r["tokens_to_match_best"] == ">16"
    assert r["width_vs_depth_z"] is not None and r["width_vs_depth_z"] > 0
    assert r["flops"]["slm"] == meta["slm"]["flops"]["total"] and r["arms"]["slm"]["flops"] == r["flops"]["slm"]
    assert r["best_arm_charged"] in r["arms"] and r["pareto_front"][0] == "scratch"
    adv = {a: row["charged_reference_loss"] - row["task_val_loss_mean"] for a, row in r["arms"].items()}
    assert r["best_loss_advantage_charged"] == pytest.approx(adv[r["best_arm_advantage_charged"]])
    assert r["best_loss_advantage_charged"] == pytest.approx(max(adv[a] for a in adv if a != "scratch" and
                                                                 not a.startswith(("scratch_x", "prune_"))))
    assert r["teacher_tokens_to_match"] == ">16"  # the teacher (3.0) is below every scratch run
    assert "note" in r and json.loads(json.dumps(r, default=str))["amortised"]["general_student_flops"] == 1e12
    text = report.summary({"profile": "quick", "seeds": [0, 1], **r})
    assert "progressive" in text and "amortised" in text
    report.plot(r, tmp_path / "flops.png", "test")
    assert (tmp_path / "flops.png").stat().st_size > 0


def test_each_run_gets_its_own_config_and_log_even_with_a_dot_in_its_name(bench, tmp_path, monkeypatch):
    """general/h0.1_s0 and h0.1_s1 run side by side: Path.with_suffix would give both general/h0.yaml."""
    calls = []
    monkeypatch.setattr(bench, "run_module", lambda cwd, module, cfg, log=None: calls.append((cfg, log)))
    b = bench.Bench(bench.PROFILES["quick"], tmp_path, jobs=2)
    for seed in (0, 1):
        b.launch("slm_assist.compress", tmp_path / "general" / f"h0.1_s{seed}", {"seed": seed})
    assert [(c.split("/")[-1], log.name) for c, log in calls] == [("h0.1_s0.yaml", "h0.1_s0.log"),
                                                                  ("h0.1_s1.yaml", "h0.1_s1.log")]
    assert [yaml.safe_load(open(c))["run_dir"].endswith(f"h0.1_s{s}") for s, (c, _) in enumerate(calls)] == [True, True]
