"""bench/salt.py's arms and plans: every arm's distill settings (a function of the corpus's context: its SLM,
scores, subsets, and the choices the screen made), SALT with several levers at once, issue 13's confirm plan and
issue 26's combination, and the profiles (model sizes and budgets). Pure: it trains and reads nothing.

The arms: baseline (CE); salt (the paper: forward KL, tau 1, w 0.667 for the first 20% of steps);
ls_control (that schedule towards a label-smoothed one-hot); salt_ds; gate_topk / gate_confidence; handover;
ensemble_mean / _vote (3 SLMs); curriculum; cl_filter; z_loss; tau / w / n_KD sweeps; KD kinds at the best w.
Issue 26: exit_<linear|cosine>_<f> (after the KD phase w decays to 0 over f of the run); tau_0.5_n_kd_<f>_exit (tau
0.5, a KD phase of f, then the best exit); align_<f> (LET: block 1 towards the SLM's last hidden state, cosine,
weight 0.1 decaying to 0 over f).
"""

from __future__ import annotations

import json
import math

from salt_report import FIXED, rank_key  # bench/salt_report.py, next to this module

from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError
from slm_assist.salt.recipe import RunConfig

N_KD = 0.2  # the paper's KD phase: the first 20% of steps

SLM_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=172, lr=3e-3)
PROFILES = {
    # 3.4M-param LLM, 800 steps of 8 x 256 tokens (1.6M tokens): ~6 min a run, 51 runs in ~6 h. The SLM (0.37M)
    # trains half the LLM's steps, so the baseline overtakes it early: the paper's regime by construction.
    "full": dict(vocab=4096, seq=256, batch=8, steps=800, warmup=40, eval_every=40, eval_batches=16,
                 corpus_chars=12_000_000, val_fraction=0.08, ood_chars=2_000_000, cloze=1000, ood_rows=256, seeds=3, ensemble=3,
                 slm=SLM_SHAPE, slm_steps=400, llm=dict(hidden_size=192, num_layers=6, num_heads=3, ffn_size=512, lr=2e-3),
                 singles=2, combo=3, kd_rounds=4, kd_steps=4,
                 # 7.4M, 13.7M: width and depth x4/3, x5/3 (head dim 64); step FLOPs 2.1x, 3.8x the 3.4M's: ~14,
                 # ~23 min a run beside another (measured). lr ~1/d or half that, whichever gives the baseline
                 # (seed 0) the lower final loss (at 7.4M the half ended 0.11 lower in a probe). 3 seeds: a claim
                 # needs 3 (the project's rule; 2 gave z -1.96): 14 runs, ~2.2 h two at a time
                 scale=[dict(hidden_size=256, num_layers=8, num_heads=4, ffn_size=688, lrs=(1.5e-3, 7e-4)),
                        dict(hidden_size=320, num_layers=10, num_heads=5, ffn_size=864, lrs=(1.2e-3, 6e-4))],
                 scale_seeds=3),
    # Test scale: every arm, phase and figure in a few minutes; the figures say nothing about SALT.
    "quick": dict(vocab=1024, seq=64, batch=8, steps=40, warmup=4, eval_every=10, eval_batches=4,
                  corpus_chars=250_000, val_fraction=0.2, ood_chars=100_000, cloze=50, ood_rows=32, seeds=2, ensemble=2,
                  slm=dict(SLM_SHAPE, hidden_size=32, ffn_size=86), slm_steps=20,
                  llm=dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=172, lr=3e-3),
                  singles=1, combo=2, kd_rounds=1, kd_steps=2,
                  scale=[dict(hidden_size=96, num_layers=2, num_heads=2, ffn_size=256, lrs=(3e-3, 1.5e-3)),
                         dict(hidden_size=128, num_layers=2, num_heads=2, ffn_size=344, lrs=(3e-3,))], scale_seeds=2),
}


def salt(c: dict, **extra) -> dict:
    """The paper's recipe (SALT's step schedule, forward KL at tau 1) plus `extra` settings."""
    return {"distill.source.kind": "teacher", "distill.source.teachers": [c["slm"]], "distill.schedule.kind": "step",
            "distill.schedule.weight": 0.667, "distill.schedule.n_kd_fraction": N_KD, **extra}


ARMS13 = {
    "baseline": lambda c: {},
    "salt": lambda c: salt(c),
    "ls_control": lambda c: {**{k: v for k, v in salt(c).items() if k != "distill.source.teachers"},
                             "distill.source.kind": "label_smoothing", "distill.source.epsilon": c["eps"]},
    "salt_ds": lambda c: salt(c, **{"distill.data.selection": c["select"]["salt_ds"]}),
    "gate_topk": lambda c: salt(c, **{"distill.gate.topk": 8}),
    "gate_confidence": lambda c: salt(c, **{"distill.gate.confidence": 0.5}),
    "handover": lambda c: salt(c, **{"distill.handover.every": c["p"]["eval_every"] // 2}),
    "ensemble_mean": lambda c: salt(c, **{"distill.source.teachers": [c["slm"], *c["ensemble"]]}),
    "ensemble_vote": lambda c: salt(c, **{"distill.source.teachers": [c["slm"], *c["ensemble"]],
                                          "distill.source.combine": "vote"}),
    "curriculum": lambda c: salt(c, **{"distill.data.curriculum": "mean_loss", "distill.data.curriculum_scores": c["scores"]}),
    "cl_filter": lambda c: salt(c, **{"distill.data.selection": c["select"]["cl"]}),
    "z_loss": lambda c: salt(c, **{"train.z_loss": 1e-4}),
    "tau_0.5": lambda c: salt(c, **{"distill.loss.tau": 0.5}),
    "tau_2": lambda c: salt(c, **{"distill.loss.tau": 2.0}),
    "w_0.5": lambda c: salt(c, **{"distill.schedule.weight": 0.5}),
    "w_0.8": lambda c: salt(c, **{"distill.schedule.weight": 0.8}),
    "n_kd_0.1": lambda c: salt(c, **{"distill.schedule.n_kd_fraction": 0.1}),
    "n_kd_0.3": lambda c: salt(c, **{"distill.schedule.n_kd_fraction": 0.3}),
    # the KD kinds at the w that screened best (the w arms run first)
    "kind_reverse_kl": lambda c: salt(c, **{"distill.loss.kind": "reverse_kl", "distill.schedule.weight": c["best_w"]}),
    "kind_jsd": lambda c: salt(c, **{"distill.loss.kind": "jsd", "distill.schedule.weight": c["best_w"]}),
    "kind_nkd": lambda c: salt(c, **{"distill.loss.kind": "nkd", "distill.schedule.weight": c["best_w"]}),
}
W_ARMS = {"salt": 0.667, "w_0.5": 0.5, "w_0.8": 0.8}


def exit_window(fraction: float, shape: str) -> dict:
    return {"distill.schedule.exit_fraction": fraction, "distill.schedule.exit_shape": shape}


def align(fraction: float) -> dict:
    """LET's alignment at its weight (0.1) from block 1 (an early one) to the SLM's last hidden state."""
    return {"distill.align.weight": 0.1, "distill.align.layer": 1, "distill.align.kind": "cosine",
            "distill.align.fraction": fraction}


# issue 13 lost a third of the KD phase's lead within 40 steps of w's drop to 0 (bench/RESULTS.md): leave it gently
EXIT_ARMS = {f"exit_{shape}_{f}": exit_window(f, shape) for shape in ("linear", "cosine") for f in (0.1, 0.2)}
ARMS26 = {
    **{a: (lambda c, e=e: salt(c, **e)) for a, e in EXIT_ARMS.items()},
    "align_0.2": lambda c: salt(c, **align(0.2)),  # over the KD phase
    "align_0.3": lambda c: salt(c, **align(0.3)),  # a bit longer
    # the sharper teacher over a longer KD phase, left at the exit that screened best (the exit arms run first)
    "tau_0.5_n_kd_0.3_exit": lambda c: salt(c, **{"distill.loss.tau": 0.5, "distill.schedule.n_kd_fraction": 0.3,
                                                   **c["best_exit"]}),
    "tau_0.5_n_kd_0.4_exit": lambda c: salt(c, **{"distill.loss.tau": 0.5, "distill.schedule.n_kd_fraction": 0.4,
                                                   **c["best_exit"]}),
}
ARMS = {**ARMS13, **ARMS26}
SCREEN26 = (*FIXED, *ARMS26)  # what issue 26's choices read: the references and the new levers
# ctx key -> (the arms it is chosen from, with their setting; the arms that run at the best of them, after them;
# its value until then)
STAGED = {"best_w": (W_ARMS, ("kind_reverse_kl", "kind_jsd", "kind_nkd"), W_ARMS["salt"]),
          "best_exit": (EXIT_ARMS, ("tau_0.5_n_kd_0.3_exit", "tau_0.5_n_kd_0.4_exit"), EXIT_ARMS["exit_linear_0.1"])}


def as_overrides(settings: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]


def combine(arms: list[str], ctx: dict) -> dict | None:
    """SALT with several levers at once (each lever's settings that differ from SALT's), or None when two of them
    set the same key differently or the run config refuses them together (e.g. alignment with an ensemble)."""
    base, own = salt(ctx), {}
    for arm in arms:
        for k, v in ARMS[arm](ctx).items():
            if base.get(k) == v:
                continue
            if k in own and own[k] != v:
                return None
            own[k] = v
    try:
        load_config(RunConfig, None, as_overrides({**base, **own}))
    except ConfigError:
        return None
    return {**base, **own}


def confirm_plan(screen: dict[str, dict], ctx: dict, p: dict) -> dict:
    """The levers to confirm: the best `singles` by screened steps fraction, and the largest compatible
    combination (up to `combo` levers) of the best-ranked ones that beat SALT in the screen."""
    levers = sorted((a for a in screen if a not in FIXED), key=lambda a: rank_key(screen[a]))
    singles = levers[: p["singles"]]
    salt_key = rank_key(screen["salt"]) if "salt" in screen else (math.inf, math.inf)
    chosen: list[str] = []
    for a in levers:
        if len(chosen) == p["combo"] or rank_key(screen[a]) >= salt_key:
            break
        new = combine(chosen + [a], ctx)
        if new is None or new == combine(chosen, ctx):  # conflicting, or adds nothing (ensemble_mean + _vote)
            continue
        if chosen and any(new == ARMS[b](ctx) for b in ARMS):  # e.g. w_0.5 + kind_jsd at best w 0.5 = kind_jsd
            continue
        chosen.append(a)
    return {"singles": singles, "combo": chosen if len(chosen) >= 2 else [], "ranking": levers}


def frozen_plan13(result: dict, profile: str) -> dict | None:
    """Issue 13's plan as a committed results file froze it (its screen ranked only issue 13's arms, so it needs
    none of them again), or None when the file is of another profile or has no complete plan."""
    plan = result.get("plan") or {}
    if result.get("profile") != profile or not plan.get("ranking") or "best_w" not in plan:
        return None
    return {k: plan[k] for k in ("singles", "combo", "ranking", "best_w")} | {
        "reused_from": plan.get("reused_from", "issue 13's screen")}


def screen_arms(plan13: dict) -> list[str]:
    """The screen's arms: every arm, or with issue 13's plan reused only the references and issue 26's levers."""
    return [a for a in ARMS if a in SCREEN26] if plan13.get("reused_from") else list(ARMS)


def today_levers(plan: dict) -> list[str]:
    """Issue 13's best recipe, as levers: its confirmed combination (tau_0.5 + cl_filter + w_0.8), else its best
    single lever (the quick profile's plan may have no combination)."""
    return plan["combo"] or plan["singles"][:1]


def combo_name(levers: list[str]) -> str:
    return f"combo-{'+'.join(levers)}" if len(levers) > 1 else (levers or ["salt"])[0]


def new_combo(today: list[str], screen: dict[str, dict], ctx: dict) -> list[str]:
    """Issue 26's combination: today's best levers plus issue 26's, best-screened first, each compatible with those
    chosen, adding something, and beating SALT in the screen (the first is tried regardless, so the combination
    always tests one); [] when none can be added."""
    chosen, salt_key = list(today), rank_key(screen["salt"])
    for a in sorted((a for a in ARMS26 if a in screen), key=lambda a: rank_key(screen[a])):
        if len(chosen) > len(today) and rank_key(screen[a]) >= salt_key:
            break
        new = combine(chosen + [a], ctx)
        if new is not None and new != combine(chosen, ctx):
            chosen.append(a)
    return chosen if len(chosen) > max(1, len(today)) else []


def plan26_of(plan: dict, screen: dict[str, dict], ctx: dict) -> dict:
    """Issue 26's plan from the screen so far (`plan`: issue 13's): today's best recipe, its combination with the
    new levers (once every arm screened; combo_arm: its name, None without one), the issue-26 arms and that
    combination ranked, and the new best to confirm: the best-ranked, and the combination."""
    today = today_levers(plan)
    levers = new_combo(today, screen, ctx) if all(a in screen for a in SCREEN26) else []
    combo = combo_name(levers) if levers else None
    ranked = sorted((a for a in (*ARMS26, combo) if a in screen), key=lambda a: rank_key(screen[a]))
    return {"today": combo_name(today), "best_exit": ctx["best_exit"], "combo": levers, "combo_arm": combo,
            "ranking": ranked, "new_best": list(dict.fromkeys([*ranked[:1], *([combo] if combo else [])]))}


def arm_settings(arm: str, ctx: dict) -> dict:
    if arm.startswith("combo-"):
        return combine(arm[len("combo-"):].split("+"), ctx)
    return ARMS[arm](ctx)


def scale_ctxs(ctx: dict) -> dict[str, dict[str, dict]]:
    """The scale phase's larger LLMs: size name -> one context per candidate lr (the size's `lrs`),
    each in its own directory under pydoc's (the size's name at its first lr, `_lr<lr>` added for the others), on
    pydoc's data with its SLM; their runs need only their validation curves."""
    out = {}
    for size in ctx["p"]["scale"]:
        name = f"d{size['hidden_size']}_l{size['num_layers']}"
        lrs, shape = size["lrs"], {k: v for k, v in size.items() if k != "lrs"}
        out[name] = {str(lr): {**ctx, "work": ctx["work"] / "scale" / (name if i == 0 else f"{name}_lr{lr}"),
                               "llm": {**shape, "lr": lr}, "eval": False, "corpus": f"{ctx['corpus']} (LLM {name}, lr {lr})"}
                     for i, lr in enumerate(lrs)}
    return out
