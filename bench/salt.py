"""SALT benchmark (issues 13 and 26): does a small LM's help make the larger LM reach its baseline's quality in fewer
steps and less compute, which levers add to it, does it hold over seeds and corpora, and how does it scale?

Every run trains the same LLM on the same token budget; the seed sets model init and data order. Phases
(the arms and their settings: bench/salt_arms.py):

  screen   every arm, seed 0, on train_pydoc (a pilot). Issue 26's run after issue 13's, in stages: the exit and
           alignment arms; the longer KD phases at the best-screened exit; today's best recipe (issue 13's confirmed
           combination) and its combination with the new levers that screened best (combo-<levers>). Issue 13's
           plan, frozen in bench/results/salt.json, is reused: its own arms are not screened again (--rescreen13)
  confirm  baseline, salt, ls_control, today's best and the new best (the best-screened issue-26 arm, and the new
           combination), seeds 0..2 on train_pydoc and train_linuxdoc
  scale    baseline and the best recipe at two larger LLMs, the SLM fixed (the paper's two students share one SLM),
           3 seeds each on train_pydoc, in the paper's regime; each size at the better of two lrs for its baseline

Per corpus and arm (bench/salt_report.py): the share of the baseline's steps needed to reach its final validation
loss (per seed, then mean ± SE); the same share of its compute with each KD step (w_t > 0 or alignment on) charged
at the FLOP limit (flop fraction), at the KD ÷ CE step time measured here (CPU) and in bench/results/gpu.json (wall
fractions), and with the SLM's own making charged too; final and OOD (train_perldoc) validation loss, cloze
accuracy, z against SALT (paired by seed), and the lead over the baseline at the end of the arm's KD phase (its
last step with w_t > 0 or alignment on), at the goal's share of the run and at the end. The baseline must overtake
the SLM within the first 60% of the run (the paper's regime), or the benchmark exits non-zero. Goals: the best
recipe at <= 0.62 of the baseline's steps and <= 0.66 of its FLOPs on both corpora (3 seeds, OOD not worse); the
scale trend of its saving.

    python bench/salt.py            # full profile: screen, confirm, scale -> bench/results/salt.json
    python bench/salt.py --quick    # test scale: every arm, phase and plot
    python bench/salt.py --phase screen   # only the screen; --phase confirm: screen and confirm
    python bench/salt.py --phase scale    # only the scale phase (the best confirmed recipe, else today's best)
    python bench/salt.py --report-only    # results and plots of the runs finished so far (a sweep in progress)

Finished runs and their evaluations are reused (a killed run resumes from its checkpoint), so a sweep may span
sessions; the choices are frozen in runs/bench/salt13_<profile>/ (plan.json, plan26.json, scale_plan.json: the
scale arm and each size's lr). --seeds N adds confirm seeds; --fresh starts over; --jobs N (default 2) trains N runs
side by side, cpu_count / N threads each (bench/parallel.py), each logging to <run_dir>.log.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from parallel import LOCK, Jobs, threads_per_job  # bench/parallel.py, next to this script
from salt_arms import (
    ARMS,
    ARMS13,
    N_KD,
    PROFILES,
    STAGED,
    arm_settings,
    confirm_plan,
    frozen_plan13,
    plan26_of,
    scale_ctxs,
    screen_arms,
)
from salt_report import (
    FIXED,
    GOAL,
    best_recipe,
    cost_figures,
    gpu_kd_step_ratio,
    kd_steps,
    loss_at,
    plot,
    plot_scale,
    scale_table,
    scale_trend,
    summarise_arm,
    summary,
)
from salt_setup import OOD_CORPUS, REPO, model_overrides, prepare, read_json, save_json, train

from slm_assist.core.dataset import read_manifest
from slm_assist.eval import cloze_accuracy, dataset_loss, load_model
from slm_assist.training.metrics import mean_se, steps_to_reach, val_curve
from slm_assist.training.models import count_params

RESULTS = REPO / "bench" / "results"
GPU_JSON = RESULTS / "gpu.json"  # bench/gpu/verify.py's figures, when a GPU run left them
REGIME = 0.6  # the baseline must overtake the SLM within this fraction of the run


# ---- runs and their figures ------------------------------------------------------------------------------------

def evaluate(ctx: dict, arm: str, seed: int) -> dict:
    """Final figures of one run, cached next to the corpus's runs."""
    cache_file, key = ctx["work"] / "evals.json", f"{arm}/seed{seed}"
    with LOCK:  # one evaluation at a time, beside the runs still training
        evals = read_json(cache_file)
        if key not in evals:
            p, run_dir = ctx["p"], ctx["work"] / arm / f"seed{seed}"
            model, tok = load_model(run_dir / "final", torch.device("cpu"))
            evals[key] = {"full_val_loss": dataset_loss(model, tok, ctx["data"])["loss"],
                          "ood_val_loss": dataset_loss(model, tok, ctx["ood"], max_rows=p["ood_rows"])["loss"],
                          "cloze_acc": cloze_accuracy(model, tok, ctx["cloze"])["accuracy"]}
            save_json(cache_file, evals)
        return evals[key]


def run_arm(ctx: dict, arm: str, seed: int, overrides: dict) -> None:
    """Train one run of `arm` at the ctx's LLM size and evaluate it (the scale phase's runs need only curves)."""
    p = ctx["p"]
    train(ctx["work"] / arm / f"seed{seed}", p, ctx["data"], ctx.get("llm", p["llm"]), p["steps"], seed, overrides,
          ctx["threads"])
    if ctx.get("eval", True):
        evaluate(ctx, arm, seed)


def submit(jobs: Jobs, ctx: dict, arm: str, seed: int, profile: str) -> None:
    """Queue one run; a baseline's regime check runs right after it."""
    jobs.submit(partial(run_arm, ctx, arm, seed, arm_settings(arm, ctx)),
                then=partial(check_regime, ctx, seed, profile) if arm == "baseline" else None)


def crossover(ctx: dict, seed: int) -> float | None:
    """The fraction of the run at which the baseline of `seed` overtakes the SLM's final validation loss."""
    cross = steps_to_reach(val_curve(ctx["work"] / "baseline" / f"seed{seed}"), val_curve(ctx["slm_dir"])[-1][1])
    return None if cross is None else cross / ctx["p"]["steps"]


def check_regime(ctx: dict, seed: int, profile: str) -> None:
    """Exit, before more hours are spent, when a baseline run is outside the paper's regime."""
    frac, slm_final = crossover(ctx, seed), val_curve(ctx["slm_dir"])[-1][1]
    if profile == "full" and (frac is None or frac > REGIME):
        sys.exit(f"error: {ctx['corpus']} seed {seed}: the baseline overtakes the SLM (final val loss {slm_final:.3f}) "
                 + ("never" if frac is None else f"at {frac:.0%} of the run")
                 + f", outside the paper's regime (<= {REGIME:.0%}); weaken the SLM (slm_steps) or lengthen the run")


def runs_of(ctx: dict, arm: str) -> dict[int, dict]:
    """Per finished seed of `arm`: its curve and evaluation, the steps fraction against the same seed's baseline
    final validation loss, and its lead over that baseline at the end of its own KD phase (its last step with
    w_t > 0 or alignment on: n_kd plus any exit window; SALT's for the baseline), at GOAL of the run and at the end."""
    steps, out = ctx["p"]["steps"], {}
    kd_end = kd_steps(arm_settings(arm, ctx), steps) or round(N_KD * steps)
    for d in sorted(p for p in (ctx["work"] / arm).glob("seed*") if p.is_dir()):  # not the runs' .log files
        seed = int(d.name[4:])
        base = ctx["work"] / "baseline" / d.name
        if not (d / "final" / "config.json").is_file() or not (base / "final" / "config.json").is_file():
            continue
        ev = read_json(ctx["work"] / "evals.json").get(f"{arm}/{d.name}") if ctx.get("eval", True) else {}
        if ev is None:
            continue
        curve, base_curve = val_curve(d), val_curve(base)
        reach = steps_to_reach(curve, base_curve[-1][1])
        out[seed] = {"final_val_loss": curve[-1][1], "steps_fraction": None if reach is None else reach / steps,
                     "val_lead_at_kd_end": loss_at(base_curve, kd_end) - loss_at(curve, kd_end),
                     "val_lead_at_goal": loss_at(base_curve, GOAL * steps) - loss_at(curve, GOAL * steps),
                     "val_lead_final": base_curve[-1][1] - curve[-1][1],
                     **ev, "wall_s": read_json(ctx["work"] / "wall_s.json").get(f"{arm}/{d.name}"), "val_curve": curve}
    return out


def best_screened(ctx: dict, arms: dict) -> str | None:
    """The arm of `arms` whose seed-0 run reached the baseline in the fewest steps (then the lowest final loss)."""
    done = {a: r for a in arms if (r := runs_of(ctx, a).get(0)) is not None}
    return min(done, key=lambda a: ((done[a]["steps_fraction"] or math.inf), done[a]["final_val_loss"]),
               default=None)


# ---- KD costs and the results ---------------------------------------------------------------------------------

def kd_costs(p: dict, ctx: dict, skip_memory: bool) -> dict:
    """Step-time ratios on this benchmark's LLM + SLM, and the loss-memory ratios at vocab 32k, seq 2048, measured
    by bench/kd_overhead.py in its own process."""
    out = ctx["work"] / "kd_overhead.json"
    if not out.is_file():
        llm = [f"data.path={ctx['data']}", f"train.micro_batch_size={p['batch']}", *model_overrides(p["llm"], p)]
        subprocess.run([sys.executable, str(REPO / "bench" / "kd_overhead.py"), "--rounds", str(p["kd_rounds"]),
                        "--steps", str(p["kd_steps"]), "--teacher", ctx["slm"], "--work",
                        str(ctx["work"] / "kd_overhead"), "--out", str(out), *(["--skip-memory"] if skip_memory else []),
                        *[f"--llm={o}" for o in llm], f"--score=data={ctx['data']}"], cwd=REPO, check=True)
    res = json.loads(out.read_text())
    st, mem = res["step_time"], res.get("memory", {})
    return {"kd_step_ratio_online": st["kd_step_ratio_online"], "kd_step_ratio_cached": st["kd_step_ratio_cached"],
            "flop_limit": st["flop_limit"],
            "kd_loss_mem_ratio_chunked": mem.get("vocab_32000", {}).get("salt_fused_auto_vs_ce",
                                                                        mem.get("salt_fused_131_vs_ce"))}


# ---- the phases ------------------------------------------------------------------------------------------------

def screen_phase(ctx: dict, jobs: Jobs, train_runs: bool, profile: str, work: Path,
                 reuse: dict | None = None) -> tuple[dict, dict, bool]:
    """The screen on pydoc, seed 0: every arm in order (an arm of STAGED runs at the best of its group, so after
    it), then today's best recipe and issue 26's combination. Returns issue 13's plan, issue 26's and whether the
    screen is complete; each plan is frozen in its file once its runs are done, so later sessions use the same.
    `reuse`: issue 13's plan as a results file froze it; the screen then runs only the references and issue 26's
    arms (issue 13's own arms were screened once, and their choices are all the later phases read)."""
    p, chosen = ctx["p"], set()
    plan_file, plan26_file = work / "plan.json", work / "plan26.json"
    if not plan_file.is_file() and reuse is not None:
        save_json(plan_file, reuse)
    ctx["best_w"] = (plan := read_json(plan_file)).get("best_w", ctx["best_w"])
    for arm in screen_arms(plan):
        for key, (group, after, _) in STAGED.items():
            if arm in after and key not in chosen:
                chosen.add(key)
                jobs.drain()
                if (best := best_screened(ctx, group)) is not None:
                    ctx[key] = group[best]
        if train_runs:
            submit(jobs, ctx, arm, 0, profile)
    jobs.drain()
    screen = {a: summarise_arm({0: r[0]}, {}, {}) for a in ARMS if 0 in (r := runs_of(ctx, a))}
    screen13 = {a: s for a, s in screen.items() if a in ARMS13}  # issue 13's plan ranks only its own arms
    if not plan_file.is_file() and len(screen13) == len(ARMS13):
        save_json(plan_file, {**confirm_plan(screen13, ctx, p), "best_w": ctx["best_w"]})
    plan = read_json(plan_file) or {"singles": [], "combo": [], "best_w": ctx["best_w"],
                                "ranking": confirm_plan(screen13, ctx, p)["ranking"] if "salt" in screen13 else []}
    ctx["best_w"] = plan["best_w"]
    if not plan26_file.is_file():  # today's best and the new combination, screened after the rest
        plan26 = plan26_of(plan, screen, ctx)
        extra = [a for a in (plan26["today"], plan26["combo_arm"]) if a]
        for a in extra if train_runs else ():
            submit(jobs, ctx, a, 0, profile)
        jobs.drain()
        screen.update({a: summarise_arm({0: r[0]}, {}, {}) for a in extra if 0 in (r := runs_of(ctx, a))})
        plan26 = plan26_of(plan, screen, ctx)
        if all(a in screen for a in (*screen_arms(plan), *extra)):
            save_json(plan26_file, plan26)
    plan26 = read_json(plan26_file) or plan26
    ctx["best_exit"] = plan26["best_exit"]
    return plan, plan26, plan26_file.is_file()


def final_loss(ctx: dict, arm: str, seed: int) -> float | None:
    """A finished run's final validation loss, else None."""
    d = ctx["work"] / arm / f"seed{seed}"
    return val_curve(d)[-1][1] if (d / "final" / "config.json").is_file() else None


def pick_lrs(cands: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Per scale size, the candidate lr whose seed-0 baseline ended lowest: each size's baseline at its better lr,
    so the trend is not an artefact of one size's lr."""
    out = {}
    for name, by_lr in cands.items():
        finals = {lr: final_loss(sc, "baseline", 0) for lr, sc in by_lr.items()}
        if None in finals.values():
            sys.exit(f"error: scale {name}: the lr candidates' baselines did not all finish ({finals})")
        out[name] = min(finals, key=finals.get)
    return out


def scale_figures(ctx: dict, sctxs: dict[str, dict], arm: str, n_slm: int | None) -> tuple[dict, dict]:
    """The scale table (this profile's LLM from the confirm runs, then the larger ones) and per size its LLM and
    where its baseline overtakes the SLM, and its baseline's final loss (is the larger LLM the stronger one?)."""
    rows, sizes = {}, {}
    for c in (ctx, *sctxs.values()):
        if (n := _params(c["work"] / "baseline" / "seed0" / "final")) is None or n_slm is None:
            continue
        runs = {a: runs_of(c, a) for a in ("baseline", arm)}
        rows[n] = {a: [r["steps_fraction"] for r in by_seed.values()] for a, by_seed in runs.items() if by_seed}
        cross = [x for s in runs["baseline"] if (x := crossover(c, s)) is not None]
        base = [r["final_val_loss"] for r in runs["baseline"].values()]
        sizes[str(n)] = {"llm": c.get("llm", c["p"]["llm"]), "crossover_fraction": mean_se(cross)[0] if cross else None,
                         "baseline_final_val_loss_mean": mean_se(base)[0] if base else None}
    kd = {a: kd_steps(arm_settings(a, ctx), ctx["p"]["steps"]) for a in ("baseline", arm)}
    return scale_table(rows, kd, ctx["p"]["steps"], n_slm or 1), sizes


def corpus_figures(ctx: dict, confirm: list[str], profile: str, ratios: dict) -> dict:
    """One corpus's regime, the lead the goal needs, and every arm with runs: its statistics over seeds, settings
    and compute figures."""
    p, tokens = ctx["p"], ctx["p"]["batch"] * ctx["p"]["seq"]
    base, salt_runs = runs_of(ctx, "baseline"), runs_of(ctx, "salt")
    costs = {"steps": p["steps"], "n_slm": _params(Path(ctx["slm"])),
             "n_llm": _params(ctx["work"] / "baseline" / "seed0" / "final"), "slm_tokens": p["slm_steps"] * tokens,
             "run_tokens": p["steps"] * tokens, "scored_tokens": read_manifest(ctx["data"])["splits"]["train"]["tokens"],
             **ratios}
    arms = {}
    for a in dict.fromkeys((*ARMS, *confirm)):
        if runs := runs_of(ctx, a):
            settings = arm_settings(a, ctx)
            arms[a] = {**summarise_arm(runs, salt_runs, base), "settings": settings,
                       **cost_figures([r["steps_fraction"] for r in runs.values()], settings, costs)}
    cross = [crossover(ctx, s) for s in base]
    reached = [c for c in cross if c is not None]
    return {"regime_ok": profile == "full" and bool(cross) and all(c is not None and c <= REGIME for c in cross),
            "crossover_fraction": mean_se(reached)[0] if reached else None,
            # the lead over the baseline an arm needs at GOAL of the run to meet the goal there
            "val_lead_needed_for_goal": mean_se([loss_at(r["val_curve"], GOAL * p["steps"]) - r["final_val_loss"]
                                                 for r in base.values()])[0] if base else None,
            "slm_final_val_loss": val_curve(ctx["slm_dir"])[-1][1],
            "baseline_final_val_loss_mean": arms["baseline"]["final_val_loss_mean"] if "baseline" in arms else None,
            "label_smoothing_eps": ctx["eps"], "cl_filter_cut": ctx["cl_cut"], "cl_filter_excluded": ctx["cl_flagged"],
            "data_manifest": read_manifest(ctx["data"]), "arms": arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="test-scale profile: every arm, phase and plot")
    ap.add_argument("--phase", choices=("screen", "confirm", "scale", "all"), default="all",
                    help="screen; confirm (after the screen); scale (only); all: screen, confirm, scale")
    ap.add_argument("--seeds", type=int, default=0, help="confirm-phase seeds (default: the profile's, >= 3 full)")
    ap.add_argument("--fresh", action="store_true", help="delete this profile's earlier runs first")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs side by side, each with cpu_count / jobs threads and its log in <run_dir>.log")
    ap.add_argument("--skip-memory", action="store_true", help="skip the KD-loss memory probes")
    ap.add_argument("--rescreen13", action="store_true",
                    help="screen issue 13's arms again instead of reusing the plan bench/results/salt.json froze")
    ap.add_argument("--check", action="store_true", help="only check the profiles")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the results and plots of the runs finished so far")
    args = ap.parse_args()
    for name, prof in PROFILES.items():
        if prof["steps"] % prof["eval_every"] or prof["slm_steps"] % prof["eval_every"]:
            sys.exit(f"error: profile {name}: steps and slm_steps must be multiples of eval_every")
        if any(s["hidden_size"] % s["num_heads"] for s in (prof["llm"], *prof["scale"])):
            sys.exit(f"error: profile {name}: an LLM's hidden_size is not a multiple of its num_heads")
    if args.check:
        print(f"profiles ok: {', '.join(PROFILES)}; arms: {len(ARMS)}")
        return
    if args.jobs < 1:
        sys.exit(f"error: --jobs: expected >= 1, got {args.jobs}")
    profile = "quick" if args.quick else "full"
    p = PROFILES[profile]
    seeds = args.seeds or p["seeds"]
    work = REPO / "runs" / "bench" / f"salt13_{profile}"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(args.jobs) if args.jobs > 1 else 0  # 0: one run at a time, the config's threads
    torch.set_num_threads(threads or 2)
    t_start = time.time()
    jobs = Jobs(args.jobs)

    ctxs = {"pydoc": {**prepare("pydoc", p, work), "threads": threads}}
    screen_ctx = ctxs["pydoc"]
    reuse = None if args.rescreen13 or args.quick else frozen_plan13(read_json(RESULTS / "salt.json"), profile)
    plan, plan26, screen_done = screen_phase(screen_ctx, jobs, not args.report_only and args.phase != "scale",
                                             profile, work, reuse)
    confirm = list(dict.fromkeys([*FIXED, plan26["today"], *plan26["new_best"]]))
    chosen = {"best_w": plan["best_w"], "best_exit": plan26["best_exit"], "threads": threads}
    if args.phase in ("confirm", "all") and not args.report_only:
        ctxs["linuxdoc"] = {**prepare("linuxdoc", p, work), **chosen}
        for seed in range(seeds):  # seed-major: a sweep cut short still has whole seeds on both corpora
            for ctx in ctxs.values():
                for arm in confirm:
                    submit(jobs, ctx, arm, seed, profile)
        jobs.drain()
    elif (work / "linuxdoc" / "scores" / "manifest.json").is_file():
        ctxs["linuxdoc"] = {**prepare("linuxdoc", p, work), **chosen}

    kd = (kd_costs(p, screen_ctx, args.skip_memory or profile == "quick")
          if not args.report_only or (screen_ctx["work"] / "kd_overhead.json").is_file() else
          dict.fromkeys(("kd_step_ratio_online", "kd_step_ratio_cached", "flop_limit", "kd_loss_mem_ratio_chunked")))
    ratios = {"kd_step_ratio": kd["kd_step_ratio_online"], "kd_step_ratio_gpu": gpu_kd_step_ratio(GPU_JSON)}
    corpora = {name: corpus_figures(ctx, confirm, profile, ratios) for name, ctx in ctxs.items()}
    best_arm, goal = best_recipe(corpora, confirm, seeds)
    sizes = {"slm_params": _params(Path(screen_ctx["slm"])),
             "llm_params": _params(screen_ctx["work"] / "baseline" / "seed0" / "final")}

    cands, scale_file = scale_ctxs(screen_ctx), work / "scale_plan.json"
    splan = read_json(scale_file)
    scale_arm = splan.get("arm") or best_arm or plan26["today"]  # frozen when the scale runs start
    if args.phase in ("scale", "all") and not args.report_only:
        save_json(scale_file, {**splan, "arm": scale_arm})
        if "lr" not in splan:  # each size's lr: its candidates' seed-0 baselines, the lowest final loss wins
            for by_lr in cands.values():
                for sc in by_lr.values():
                    submit(jobs, sc, "baseline", 0, profile)
            jobs.drain()
            splan = {"arm": scale_arm, "lr": pick_lrs(cands)}
            save_json(scale_file, splan)
        for seed in range(p["scale_seeds"]):
            for name, by_lr in cands.items():
                for arm in ("baseline", scale_arm):
                    submit(jobs, by_lr[splan["lr"][name]], arm, seed, profile)
        jobs.drain()
    chosen_lr = splan.get("lr") or {n: next(iter(by_lr)) for n, by_lr in cands.items()}
    sctxs = {n: by_lr[chosen_lr[n]] for n, by_lr in cands.items()}
    scale, scale_sizes = scale_figures(screen_ctx, sctxs, scale_arm, sizes["slm_params"])
    for name, by_lr in cands.items():  # the seed-0 baseline's final loss at each candidate lr
        if (n := _params(sctxs[name]["work"] / "baseline" / "seed0" / "final")) is not None:
            scale_sizes[str(n)]["lr_candidates"] = {lr: final_loss(sc, "baseline", 0) for lr, sc in by_lr.items()}

    result = {"profile": profile, "test_scale": profile == "quick", "phase": args.phase, "corpora": corpora,
              "best_arm": best_arm, "goal": goal, "plan": plan, "plan26": plan26, "confirm_arms": confirm,
              "seeds": seeds, "ood_corpus": str(OOD_CORPUS), "steps": p["steps"],
              "token_budget": p["steps"] * p["batch"] * p["seq"], "slm_steps": p["slm_steps"],
              "n_kd_steps": round(N_KD * p["steps"]), "sizes": {**sizes, "slm": p["slm"], "llm": p["llm"]},
              **kd, "kd_step_ratio_gpu": ratios["kd_step_ratio_gpu"],
              "scale_arm": scale_arm, "scale_seeds": p["scale_seeds"], "scale": scale, "scale_sizes": scale_sizes,
              "scale_trend": scale_trend(scale, scale_arm), "screen_complete": screen_done,
              "wall_s_training": round(sum(sum(read_json(c["work"] / "wall_s.json").values())
                                           for c in (*ctxs.values(), *(sc for by_lr in cands.values()
                                                                        for sc in by_lr.values()))), 1),
              "wall_s_this_invocation": round(time.time() - t_start, 1)}
    if profile == "quick":
        result["note"] = ("TEST SCALE: tiny models and a few dozen steps; the figures check that every arm, phase and "
                          "plot runs and say nothing about SALT")
    out = RESULTS
    suffix = "" if profile == "full" else "_quick"
    plot_dir = out / f"salt{suffix}"
    plot_dir.mkdir(exist_ok=True)
    curves = {c: {a: [r["val_curve"] for r in runs_of(ctx, a).values()] for a in confirm} for c, ctx in ctxs.items()}
    title = f"SALT ({profile}): LLM {(sizes['llm_params'] or 0) / 1e6:.2f}M, SLM {(sizes['slm_params'] or 0) / 1e6:.2f}M"
    plot(corpora, curves, p["steps"], result["n_kd_steps"], len(ARMS), plot_dir, title)
    if scale:
        plot_scale(scale, scale_arm, plot_dir, f"SALT ({profile}) on pydoc: {scale_arm} by LLM size, SLM fixed")
    save_json(out / f"salt{suffix}.json", result)
    print(summary(result))


def _params(model_dir: Path) -> int | None:
    """A trained model's parameter count; None before it exists."""
    return count_params(load_model(model_dir, torch.device("cpu"))[0]) if (model_dir / "config.json").is_file() else None


if __name__ == "__main__":
    main()
