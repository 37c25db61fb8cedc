"""The SALT benchmark's derived figures: steps to reach a target loss (interpolated), the profile check, the arms
and plans, what a recipe costs (KD steps with an exit window and alignment, flop / wall / charged fractions), the
scale trend and the goals."""

from __future__ import annotations

import sys

import pytest

from slm_assist.core.config import load_config
from slm_assist.training.metrics import steps_to_reach

from .conftest import REPO, clean_env, load_bench


def test_steps_to_reach_interpolates_between_evals():
    curve = [(50, 5.0), (100, 4.0), (150, 3.5), (200, 3.4)]
    assert steps_to_reach(curve, 4.0) == 100
    assert steps_to_reach(curve, 3.75) == pytest.approx(125.0)
    assert steps_to_reach(curve, 6.0) == 50  # already below at the first eval
    assert steps_to_reach(curve, 3.0) is None  # never reached
    assert steps_to_reach([(50, 5.0), (100, 5.0), (150, 4.0)], 5.0) == 50


def test_profiles_end_on_an_eval():
    """bench/salt.py refuses to run a profile whose last step is not an evaluation."""
    import subprocess

    res = subprocess.run([sys.executable, str(REPO / "bench" / "salt.py"), "--check"], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "profiles ok: full, quick" in res.stdout


@pytest.fixture(scope="module")
def bench():
    return load_bench("salt")


@pytest.fixture(scope="module")
def arms():
    return load_bench("salt_arms")


@pytest.fixture(scope="module")
def report():
    return load_bench("salt_report")


def _ctx():
    return {"slm": "S", "ensemble": ["E1", "E2"], "scores": "SC", "select": {"salt_ds": "DS", "cl": "CL"},
            "eps": 0.7, "best_w": 0.5, "best_exit": {"distill.schedule.exit_fraction": 0.2,
                                                     "distill.schedule.exit_shape": "cosine"},
            "p": {"eval_every": 40}}


def test_every_arm_is_a_valid_run_config_and_off_means_the_papers_recipe(bench):
    from slm_assist.salt.recipe import RunConfig

    for arm, settings in bench.ARMS.items():
        s = settings(_ctx())
        cfg = load_config(RunConfig, None, [f"{k}={v}" for k, v in s.items()])
        if arm == "baseline":
            assert not cfg.distill.enabled
        elif arm != "ls_control":
            assert cfg.distill.source.teachers[0] == "S" and cfg.distill.schedule.kind == "step"
    assert bench.ARMS["kind_jsd"](_ctx())["distill.schedule.weight"] == 0.5  # at the best w
    assert "distill.source.teachers" not in bench.ARMS["ls_control"](_ctx())


def _screen(bench, fractions: dict):
    runs = {a: {0: {"final_val_loss": 4.0 if f is None else 3.0 + f, "steps_fraction": f, "full_val_loss": 4.0,
                    "ood_val_loss": 5.0, "cloze_acc": 0.1, "val_lead_at_kd_end": 0.1, "val_lead_final": 0.0}}
            for a, f in fractions.items()}
    return {a: bench.summarise_arm(r, {}, {}) for a, r in runs.items()}


def test_confirm_plan_takes_the_best_singles_and_a_compatible_combination(bench, arms):
    screen = _screen(bench, {"baseline": 1.0, "salt": 0.8, "ls_control": 0.9, "salt_ds": 0.6, "cl_filter": 0.65,
                             "z_loss": 0.7, "w_0.8": 0.75, "tau_2": 0.85, "handover": None})
    plan = bench.confirm_plan(screen, _ctx(), {"singles": 2, "combo": 3})
    assert plan["singles"] == ["salt_ds", "cl_filter"]
    # cl_filter sets distill.data.selection differently from salt_ds: skipped; tau_2 does not beat SALT
    assert plan["combo"] == ["salt_ds", "z_loss", "w_0.8"]
    assert plan["ranking"][-1] == "handover"  # never reached the baseline: last
    merged = bench.arm_settings("combo-salt_ds+z_loss+w_0.8", _ctx())
    assert merged["distill.data.selection"] == "DS" and merged["train.z_loss"] == 1e-4
    assert merged["distill.schedule.weight"] == 0.8
    assert arms.combine(["salt_ds", "cl_filter"], _ctx()) is None
    twins = bench.confirm_plan(_screen(bench, {"salt": 0.8, "ensemble_mean": 0.6, "ensemble_vote": 0.62,
                                               "w_0.5": 0.65, "kind_jsd": 0.7, "z_loss": 0.75}), _ctx(),
                               {"singles": 2, "combo": 3})
    # ensemble_mean + ensemble_vote is the ensemble_vote arm again: skipped
    assert twins["combo"] == ["ensemble_mean", "w_0.5", "kind_jsd"]
    same = bench.confirm_plan(_screen(bench, {"salt": 0.8, "w_0.5": 0.6, "kind_jsd": 0.62}), _ctx(),
                              {"singles": 2, "combo": 3})
    assert same["combo"] == []  # w_0.5 + kind_jsd at the best w (0.5) is the kind_jsd arm
    lone = bench.confirm_plan(_screen(bench, {"salt": 0.8, "tau_2": 0.7, "w_0.8": 0.9}), _ctx(),
                              {"singles": 2, "combo": 3})
    assert lone["combo"] == []  # a combination needs two levers that beat SALT


def test_seed_statistics_and_paired_z(bench):
    salt = {s: {"steps_fraction": f, "final_val_loss": 3.9, "ood_val_loss": 5.0, "cloze_acc": 0.1,
                "full_val_loss": 3.9, "val_lead_at_kd_end": 0.3, "val_lead_final": 0.05 + s / 100}
            for s, f in enumerate([0.70, 0.72, 0.74])}
    arm = {s: dict(r, steps_fraction=r["steps_fraction"] - d, ood_val_loss=5.0 + d / 10)
           for (s, r), d in zip(salt.items(), [0.05, 0.06, 0.07])}
    a = bench.summarise_arm(arm, salt, salt)
    assert a["n_seeds"] == 3 and not a["pilot"]
    assert a["steps_fraction_mean"] == pytest.approx(0.66)
    assert a["steps_fraction_se"] == pytest.approx(0.01 / 3**0.5)
    assert a["steps_fraction_z_vs_salt"] == pytest.approx(0.06 / (0.01 / 3**0.5))
    assert a["ood_val_loss_z_vs_baseline"] < -2  # OOD worse than the baseline, beyond 2 SE
    assert a["val_lead_at_kd_end_mean"] == pytest.approx(0.3) and a["val_lead_final_mean"] == pytest.approx(0.06)
    arm[2]["steps_fraction"] = None  # one seed never reached the baseline: no mean
    b = bench.summarise_arm(arm, salt, salt)
    assert b["steps_fraction_mean"] is None and b["n_reached"] == 2 and b["steps_fraction_z_vs_salt"] is None


def test_runs_of_measures_each_seed_against_its_own_baseline(bench, tmp_path):
    """Steps fraction and the validation lead over the baseline (at the end of SALT's KD phase, interpolated
    between evaluations, and at the end) come from the same seed's baseline; unfinished runs are left out."""
    import json

    def run(arm, seed, curve, finished=True):
        d = tmp_path / arm / f"seed{seed}"
        (d / "final").mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in curve))
        if finished:
            (d / "final" / "config.json").write_text("{}")

    run("baseline", 0, [(10, 6.0), (30, 5.0), (50, 4.0)])
    run("baseline", 1, [(10, 6.0), (30, 5.5), (50, 5.0)])
    run("salt", 0, [(10, 5.0), (30, 4.5), (50, 3.5)])
    run("salt", 1, [(10, 5.8), (30, 5.0), (50, 4.9)])
    run("salt", 2, [(10, 5.8)], finished=False)
    (tmp_path / "salt" / "seed0.log").write_text("a side-by-side run's log, not a seed")
    (tmp_path / "evals.json").write_text(json.dumps({f"salt/seed{s}": {"ood_val_loss": 5.0} for s in range(3)}))
    runs = bench.runs_of({**_ctx(), "work": tmp_path, "p": {"steps": 50}}, "salt")
    assert sorted(runs) == [0, 1]
    # seed 0 reaches its baseline's 4.0 between 30 (4.5) and 50 (3.5): step 40
    assert runs[0]["steps_fraction"] == pytest.approx(40 / 50)
    assert runs[1]["steps_fraction"] == pytest.approx(30 / 50)  # its own baseline ends at 5.0
    # KD phase ends at 20% of 50 steps = 10: lead 1.0 and 0.2
    assert runs[0]["val_lead_at_kd_end"] == pytest.approx(1.0) and runs[1]["val_lead_at_kd_end"] == pytest.approx(0.2)
    assert runs[0]["val_lead_final"] == pytest.approx(0.5) and runs[1]["val_lead_final"] == pytest.approx(0.1)
    mid = bench.loss_at([(10, 6.0), (30, 5.0)], 20)
    assert mid == pytest.approx(5.5)


def test_side_by_side_jobs_run_in_order_and_stop_at_a_failed_check():
    """bench/parallel.Jobs: two at a time, started in submission order; a job's check runs right after it, and
    when one fails (the regime check exits) the jobs not yet started are skipped and drain raises that failure."""
    import threading
    import time

    par = load_bench("parallel")
    jobs, started, lock = par.Jobs(2), [], threading.Lock()

    def job(name, seconds=0.05):
        def fn():
            with lock:
                started.append(name)
            time.sleep(seconds)
        return fn

    for i in range(5):
        jobs.submit(job(i))
    jobs.drain()
    assert started == [0, 1, 2, 3, 4]

    started.clear()

    def regime():
        sys.exit("error: outside the paper's regime")

    jobs.submit(job("baseline"), then=regime)
    for name in ("a", "b", "c", "d"):
        jobs.submit(job(name, 0.3))
    with pytest.raises(SystemExit, match="regime"):
        jobs.drain()
    time.sleep(0.4)
    assert started[0] == "baseline" and len(started) < 5  # at most the job already running beside it went on
    assert par.threads_per_job(2) >= 1


# ---- issue 26: the new arms, the KD-phase end with an exit window and alignment, compute figures, scale, goals ----

def _overrides(settings: dict) -> list[str]:
    import json

    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]


def test_issue26_arms_have_their_settings_and_validate(bench, arms):
    from slm_assist.salt.recipe import RunConfig

    salt = bench.ARMS["salt"](_ctx())
    expect = {"exit_linear_0.1": {"distill.schedule.exit_fraction": 0.1, "distill.schedule.exit_shape": "linear"},
              "exit_cosine_0.2": {"distill.schedule.exit_fraction": 0.2, "distill.schedule.exit_shape": "cosine"},
              "align_0.3": {"distill.align.weight": 0.1, "distill.align.layer": 1, "distill.align.kind": "cosine",
                            "distill.align.fraction": 0.3},
              # at the context's best exit (cosine over 0.2)
              "tau_0.5_n_kd_0.4_exit": {"distill.loss.tau": 0.5, "distill.schedule.n_kd_fraction": 0.4,
                                        "distill.schedule.exit_fraction": 0.2, "distill.schedule.exit_shape": "cosine"}}
    for arm, own in expect.items():
        assert bench.ARMS[arm](_ctx()) == {**salt, **own}
    assert set(arms.ARMS26) == {"exit_linear_0.1", "exit_linear_0.2", "exit_cosine_0.1", "exit_cosine_0.2",
                                "align_0.2", "align_0.3", "tau_0.5_n_kd_0.3_exit", "tau_0.5_n_kd_0.4_exit"}
    for arm in arms.ARMS26:
        cfg = load_config(RunConfig, None, _overrides(bench.ARMS[arm](_ctx())))
        assert cfg.distill.source.teachers == ["S"]
    cfg = load_config(RunConfig, None, _overrides(bench.ARMS["exit_cosine_0.1"](_ctx())))
    assert cfg.distill.schedule.exit_fraction == 0.1 and cfg.distill.schedule.exit_shape == "cosine"
    cfg = load_config(RunConfig, None, _overrides(bench.ARMS["align_0.2"](_ctx())))
    assert (cfg.distill.align.weight, cfg.distill.align.layer, cfg.distill.align.fraction) == (0.1, 1, 0.2)
    # the alignment needs one online SLM: with an ensemble the run config refuses it, so no combination has both
    assert arms.combine(["ensemble_mean", "align_0.2"], _ctx()) is None
    assert arms.combine(["tau_0.5", "cl_filter", "w_0.8", "exit_cosine_0.2", "align_0.2"], _ctx()) is not None


def test_kd_steps_count_the_exit_window_and_the_alignment(bench, report):
    """K = the steps with w_t > 0 or the alignment on: n_kd, plus the exit window, or the alignment's fraction
    when longer; the end of the KD phase that the leads are read at."""
    def k(arm, steps=100, **ctx):
        return report.kd_steps(bench.ARMS[arm]({**_ctx(), **ctx}), steps)

    assert k("baseline") == 0
    assert k("salt") == 20 and k("ls_control") == 20 and k("n_kd_0.3") == 30
    assert k("exit_linear_0.1") == 30 and k("exit_cosine_0.1") == 30  # 20 + 10: w > 0 on steps 0..29
    assert k("exit_linear_0.2") == 40 and k("exit_cosine_0.2") == 40
    assert k("align_0.2") == 20 and k("align_0.3") == 30  # the alignment outlasts the KD phase
    assert k("tau_0.5_n_kd_0.4_exit") == 60  # 40 + the context's exit window 20
    assert k("tau_0.5_n_kd_0.3_exit", best_exit={"distill.schedule.exit_fraction": 0.1,
                                                  "distill.schedule.exit_shape": "linear"}) == 40
    assert k("exit_linear_0.1", steps=50) == 15  # rounds: 10 + 5
    assert report.teachers(bench.ARMS["salt"](_ctx())) == 1 and report.teachers(bench.ARMS["ls_control"](_ctx())) == 0
    assert report.teachers(bench.ARMS["ensemble_vote"](_ctx())) == 3


def test_compute_fractions_by_hand(bench, report):
    """KD steps charged at 1 + N_slm / (3 N_llm) (N_slm 300, N_llm 1000: 1.1), or at a measured step-time ratio
    (each extra teacher adding its overhead again); the SLM's training and scoring added for the charged one."""
    assert report.flop_step_ratio(300, 1000) == pytest.approx(1.1)
    assert report.flop_step_ratio(361280, 3443136) == pytest.approx(1.035, abs=5e-4)  # issue 13's flop_limit
    # 560 of 800 steps, the first 160 at 1.1: (560 + 16) / 800
    assert report.compute_fraction(0.7, 160, 800, 1.1) == pytest.approx(0.72)
    assert report.compute_fraction(0.1, 160, 800, 1.1) == pytest.approx(0.11)  # reached inside the KD phase
    assert report.compute_fraction(0.7, 160, 800, 1.66) == pytest.approx(0.832)
    assert report.compute_fraction(0.7, 160, 800, report.kd_step_cost(1.66, 3)) == pytest.approx(1.096)
    assert report.compute_fraction(None, 160, 800, 1.1) is None and report.kd_step_cost(None, 1) is None
    salt, cl = bench.ARMS["salt"](_ctx()), bench.ARMS["cl_filter"](_ctx())
    tok = dict(n_slm=300, n_llm=1000, slm_tokens=400 * 2048, run_tokens=800 * 2048, scored_tokens=2 * 800 * 2048)
    assert report.slm_charge(salt, **tok) == pytest.approx(0.15)  # 6·300·(400 steps) ÷ 6·1000·(800 steps)
    assert report.slm_charge(cl, **tok) == pytest.approx(0.35)  # + 2·300·(2 x 800 steps) ÷ the same
    assert report.slm_charge(bench.ARMS["ensemble_mean"](_ctx()), **tok) == pytest.approx(0.45)
    assert report.slm_charge(bench.ARMS["ls_control"](_ctx()), **tok) == 0.0
    c = {"steps": 800, **tok, "kd_step_ratio": 1.5, "kd_step_ratio_gpu": None}
    fig = report.cost_figures([0.7, 0.74], salt, c)
    assert fig["kd_steps"] == 160
    assert fig["flop_fraction_mean"] == pytest.approx(0.74) and fig["flop_fraction_se"] == pytest.approx(0.02)
    assert fig["wall_fraction_mean"] == pytest.approx(0.82)  # (560 + 80) / 800 and (592 + 80) / 800
    assert fig["wall_fraction_gpu_mean"] is None
    assert fig["charged_fraction_mean"] == pytest.approx(0.89)
    assert report.cost_figures([0.7, None], salt, c)["flop_fraction_mean"] is None  # a seed never got there
    assert report.cost_figures([0.7], salt, {**c, "n_llm": None})["flop_fraction_mean"] is None  # no baseline yet


def test_gpu_kd_step_ratio_reads_gpu_json(report, tmp_path):
    import json

    path = tmp_path / "gpu.json"
    assert report.gpu_kd_step_ratio(path) is None
    path.write_text(json.dumps({"kd_step_ratio_online": None, "stages": {"kd": {"kd_step_ratio_online": 1.12}}}))
    assert report.gpu_kd_step_ratio(path) == pytest.approx(1.12)
    path.write_text(json.dumps({"kd_step_ratio_online": 1.07, "stages": {"kd": {"kd_step_ratio_online": 1.12}}}))
    assert report.gpu_kd_step_ratio(path) == pytest.approx(1.07)
    path.write_text(json.dumps({"mfu": 0.4}))
    assert report.gpu_kd_step_ratio(path) is None


def test_scale_table_and_trend(report):
    rows = {12_000_000: {"baseline": [1.0, 1.0], "best": [0.6, 0.62]},
            3_000_000: {"baseline": [1.0, 1.0], "best": [0.7, 0.8]}}
    scale = report.scale_table(rows, {"baseline": 0, "best": 160}, 800, 300_000)
    assert list(scale) == ["3000000", "12000000"]
    small, large = scale["3000000"]["best"], scale["12000000"]["best"]
    assert small["steps_fraction_mean"] == pytest.approx(0.75) and small["steps_fraction_se"] == pytest.approx(0.05)
    assert small["n_seeds"] == 2 and small["per_seed"] == [0.7, 0.8]
    # 160 KD steps at 1 + 0.3M / (3 x 3M) = 1 + 1/30: + 160 / 30 / 800 = 0.00667
    assert small["flop_fraction_mean"] == pytest.approx(0.75 + 1 / 150)
    assert large["flop_fraction_mean"] == pytest.approx(0.61 + 1 / 600)  # 1 + 1/120 at 12M
    assert scale["3000000"]["baseline"]["flop_fraction_mean"] == pytest.approx(1.0)
    t = report.scale_trend(scale, "best")
    assert t["direction"] == "grows" and t["llm_params"] == [3_000_000, 12_000_000]
    assert t["z"] == pytest.approx(-0.14 / (0.05**2 + 0.01**2) ** 0.5)
    assert t["beyond_2se"] is True  # z = -2.75
    rows[12_000_000]["best"] = [0.6, 0.8]  # smaller and noisier: a direction, not a result
    assert report.scale_trend(report.scale_table(rows, {"baseline": 0, "best": 160}, 800, 300_000), "best")[
        "beyond_2se"] is False
    assert report.scale_trend({"3000000": scale["3000000"]}, "best")["direction"] is None  # one size


def test_runs_of_reads_the_lead_at_the_arms_own_kd_end(bench, tmp_path):
    """With an exit window the KD phase ends where w_t reaches 0: 50 steps, n_kd 10 + an exit window of 10."""
    import json

    for arm, curve in (("baseline", [(10, 6.0), (30, 5.0), (50, 4.0)]), ("exit_linear_0.2", [(10, 5.0), (30, 4.4), (50, 3.8)])):
        d = tmp_path / arm / "seed0"
        (d / "final").mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in curve))
        (d / "final" / "config.json").write_text("{}")
    (tmp_path / "evals.json").write_text(json.dumps({"exit_linear_0.2/seed0": {"ood_val_loss": 5.0}}))
    run = bench.runs_of({**_ctx(), "work": tmp_path, "p": {"steps": 50}}, "exit_linear_0.2")[0]
    assert run["val_lead_at_kd_end"] == pytest.approx(5.5 - 4.7)  # step 20, halfway between the evals
    assert run["val_lead_at_goal"] == pytest.approx((5.0 - 0.05) - (4.4 - 0.03))  # step 31 = 62% of 50
    assert run["val_lead_final"] == pytest.approx(0.2)


def _screen_all(bench, fractions: dict):
    return _screen(bench, {a: fractions.get(a, 0.85) for a in bench.ARMS})


def test_issue26_combination_adds_the_compatible_new_levers_to_todays_best(arms, bench):
    screen = _screen_all(bench, {"salt": 0.8, "exit_cosine_0.2": 0.70, "tau_0.5_n_kd_0.3_exit": 0.71,
                                 "exit_linear_0.1": 0.72, "align_0.2": 0.75, "align_0.3": 0.78,
                                 "tau_0.5_n_kd_0.4_exit": 0.9})
    plan13 = {"combo": ["tau_0.5", "cl_filter", "w_0.8"], "singles": ["tau_0.5", "cl_filter"]}
    p26 = arms.plan26_of(plan13, screen, _ctx())
    assert p26["today"] == "combo-tau_0.5+cl_filter+w_0.8"
    # exit_linear_0.1 sets another exit window, align_0.3 another fraction; exit_cosine_0.1 (0.85) trails SALT
    assert p26["combo"] == ["tau_0.5", "cl_filter", "w_0.8", "exit_cosine_0.2", "tau_0.5_n_kd_0.3_exit", "align_0.2"]
    combo = p26["combo_arm"]
    assert p26["new_best"] == ["exit_cosine_0.2", combo]  # the combination is not screened yet
    s = bench.arm_settings(combo, _ctx())
    assert (s["distill.loss.tau"], s["distill.schedule.weight"], s["distill.schedule.n_kd_fraction"]) == (0.5, 0.8, 0.3)
    assert s["distill.data.selection"] == "CL" and s["distill.align.fraction"] == 0.2
    assert bench.kd_steps(s, 800) == 240 + 160  # n_kd 0.3 + the cosine exit over 0.2
    screen[combo] = _screen(bench, {combo: 0.6})[combo]
    assert arms.plan26_of(plan13, screen, _ctx())["new_best"] == [combo]
    # the screen not complete: no combination yet
    del screen["align_0.3"]
    assert arms.plan26_of(plan13, screen, _ctx())["combo"] == []
    # nothing new beats SALT: the best new lever is still added, alone
    flat = _screen_all(bench, {"salt": 0.5})
    assert len(arms.new_combo(plan13["combo"], flat, _ctx())) == 4


def test_goal_against_steps_and_flop_fraction_and_why_missed(report):
    def arm(sf, ff, n=3, ood_z=1.0):
        return {"steps_fraction_mean": sf, "flop_fraction_mean": ff, "n_seeds": n, "ood_val_loss_z_vs_baseline": ood_z,
                "val_lead_at_goal_mean": 0.2, "val_lead_at_kd_end_mean": 0.4, "val_lead_final_mean": 0.18,
                "kd_steps": 240}

    corpora = {"pydoc": {"val_lead_needed_for_goal": 0.24, "arms": {"a": arm(0.60, 0.65), "b": arm(0.70, 0.71)}},
               "linuxdoc": {"val_lead_needed_for_goal": 0.2, "arms": {"a": arm(0.68, 0.70), "b": arm(0.64, 0.66)}}}
    best, goal = report.best_recipe(corpora, ["baseline", "a", "b"], 3)
    assert best == "a" and goal["target"] == 0.62 and goal["flop_target"] == 0.66
    assert not goal["met"] and not goal["flop_met"] and goal["min_seeds"] == 3
    notes = report.goal_notes({"goal": goal, "best_arm": best, "corpora": corpora})
    assert any(n.startswith("linuxdoc: steps fraction 0.680 misses 0.62 by 0.060") and "needs 0.200" in n
               for n in notes)
    assert any(n.startswith("linuxdoc: flop fraction 0.700 misses 0.66 by 0.040") for n in notes)
    assert not any(n.startswith("pydoc") for n in notes)
    corpora["linuxdoc"]["arms"]["a"] = arm(0.61, 0.64)
    _, goal = report.best_recipe(corpora, ["a"], 3)
    assert goal["met"] and goal["flop_met"]
    corpora["linuxdoc"]["arms"]["a"] = arm(0.61, 0.64, ood_z=-2.5)
    assert not report.best_recipe(corpora, ["a"], 3)[1]["met"]


def test_issue13s_frozen_plan_is_reused_and_the_screen_needs_only_the_new_arms(arms, bench):
    result = {"profile": "full", "plan": {"singles": ["tau_0.5", "cl_filter"], "combo": ["tau_0.5", "cl_filter", "w_0.8"],
                                          "ranking": ["tau_0.5", "cl_filter", "w_0.8"], "best_w": 0.8}}
    plan13 = arms.frozen_plan13(result, "full")
    assert plan13["combo"] == ["tau_0.5", "cl_filter", "w_0.8"] and plan13["best_w"] == 0.8 and plan13["reused_from"]
    assert arms.frozen_plan13(result, "quick") is None  # another profile's plan
    assert arms.frozen_plan13({"profile": "full", "plan": {"singles": [], "combo": []}}, "full") is None  # incomplete
    assert arms.frozen_plan13({**result, "plan": {**plan13, "reused_from": "x"}}, "full")["reused_from"] == "x"
    screened = arms.screen_arms(plan13)
    assert screened == ["baseline", "salt", "ls_control", *arms.ARMS26]
    assert arms.screen_arms({"combo": []}) == list(arms.ARMS)
    # the combination needs only what that screen ran
    screen = _screen(bench, {a: (0.8 if a == "salt" else 0.7) for a in screened})
    p26 = arms.plan26_of(plan13, screen, _ctx())
    assert p26["today"] == "combo-tau_0.5+cl_filter+w_0.8" and p26["combo"][:3] == plan13["combo"]
    assert len(p26["combo"]) > 3


def test_scale_sizes_try_each_lr_and_keep_the_one_whose_baseline_ends_lowest(bench, arms, tmp_path):
    """Each larger LLM has a context per candidate lr (its first lr in the size's own directory, the others with
    `_lr<lr>`); pick_lrs keeps, per size, the lr whose seed-0 baseline ended lowest, and stops while one is missing."""
    import json

    p = {"scale": [dict(hidden_size=96, num_layers=2, num_heads=2, ffn_size=256, lrs=(3e-3, 1.5e-3)),
                   dict(hidden_size=128, num_layers=3, num_heads=2, ffn_size=344, lrs=(2e-3,))]}
    cands = arms.scale_ctxs({**_ctx(), "work": tmp_path, "corpus": "pydoc", "p": p})
    assert {n: list(by_lr) for n, by_lr in cands.items()} == {"d96_l2": ["0.003", "0.0015"], "d128_l3": ["0.002"]}
    assert cands["d96_l2"]["0.003"]["work"] == tmp_path / "scale" / "d96_l2"
    assert cands["d96_l2"]["0.0015"]["work"] == tmp_path / "scale" / "d96_l2_lr0.0015"
    assert cands["d96_l2"]["0.0015"]["llm"] == dict(hidden_size=96, num_layers=2, num_heads=2, ffn_size=256, lr=1.5e-3)
    assert bench.model_overrides(cands["d96_l2"]["0.0015"]["llm"], {"seq": 64})[-2] == "optim.lr=0.0015"

    def baseline(ctx, final):
        d = ctx["work"] / "baseline" / "seed0"
        (d / "final").mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": final + 1}) + "\n"
                                         + json.dumps({"step": 20, "val_loss": final}) + "\n")
        (d / "final" / "config.json").write_text("{}")

    baseline(cands["d96_l2"]["0.003"], 4.5)
    baseline(cands["d128_l3"]["0.002"], 4.2)
    with pytest.raises(SystemExit, match="d96_l2"):  # the 1.5e-3 candidate has not finished
        bench.pick_lrs(cands)
    baseline(cands["d96_l2"]["0.0015"], 4.3)
    assert bench.pick_lrs(cands) == {"d96_l2": "0.0015", "d128_l3": "0.002"}
