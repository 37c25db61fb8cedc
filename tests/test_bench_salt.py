"""The SALT benchmark's derived figures: steps to reach a target loss (interpolated) and the profile check."""

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


def _ctx():
    return {"slm": "S", "ensemble": ["E1", "E2"], "scores": "SC", "select": {"salt_ds": "DS", "cl": "CL"},
            "eps": 0.7, "best_w": 0.5, "p": {"eval_every": 40}}


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


def test_confirm_plan_takes_the_best_singles_and_a_compatible_combination(bench):
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
    assert bench.combine(["salt_ds", "cl_filter"], _ctx()) is None
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
    runs = bench.runs_of({"work": tmp_path, "p": {"steps": 50}}, "salt")
    assert sorted(runs) == [0, 1]
    # seed 0 reaches its baseline's 4.0 between 30 (4.5) and 50 (3.5): step 40
    assert runs[0]["steps_fraction"] == pytest.approx(40 / 50)
    assert runs[1]["steps_fraction"] == pytest.approx(30 / 50)  # its own baseline ends at 5.0
    # KD phase ends at 20% of 50 steps = 10: lead 1.0 and 0.2
    assert runs[0]["val_lead_at_kd_end"] == pytest.approx(1.0) and runs[1]["val_lead_at_kd_end"] == pytest.approx(0.2)
    assert runs[0]["val_lead_final"] == pytest.approx(0.5) and runs[1]["val_lead_final"] == pytest.approx(0.1)
    mid = bench._at([(10, 6.0), (30, 5.0)], 20)
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
