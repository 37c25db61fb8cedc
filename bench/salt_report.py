"""How bench/salt.py's results read: the ranking of arms, the markdown summary and the two figures. Rendering
only: it takes the results and curves bench/salt.py computed, and reads no run directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

GOAL = 0.65  # steps fraction the best recipe must reach, mean over seeds, on both corpora
FIXED = ("baseline", "salt", "ls_control")  # in every table; the rest are levers


def rank_key(a: dict) -> tuple[float, float]:
    """Arms rank by steps fraction (never reaching the baseline ranks last), then by final validation loss."""
    f = a.get("steps_fraction_mean")
    return (math.inf if f is None else f, a["final_val_loss_mean"])


def plot(corpora: dict, curves: dict[str, dict[str, list]], steps: int, n_kd: int, n_arms: int, out: Path,
         title: str) -> None:
    """curves.png: each corpus's validation curves per arm (mean, min-max band over seeds); fractions.png: every
    arm's steps fraction with its standard error. `curves`: corpus -> arm -> one [(step, loss)] list per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(corpora)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.6), squeeze=False)
    for ax, corpus in zip(axes[0], names):
        for arm, runs in curves[corpus].items():
            if not runs:
                continue
            steps_axis = [s for s, _ in runs[0]]
            ys = np.array([[v for _, v in curve] for curve in runs])
            line, = ax.plot(steps_axis, ys.mean(0), label=f"{arm} ({len(runs)} seeds)", lw=2 if arm in FIXED else 1.3)
            ax.fill_between(steps_axis, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        c = corpora[corpus]
        ax.axhline(c["slm_final_val_loss"], color="grey", ls=":", label="SLM final")
        ax.axvline(n_kd, color="k", ls="--", lw=0.8, label=f"end of SALT's KD phase ({n_kd})")
        if c.get("crossover_fraction") is not None:
            ax.axvline(c["crossover_fraction"] * steps, color="tab:red", ls=":", lw=0.8, label="baseline overtakes SLM")
        base = c["arms"].get("baseline")
        if base:
            finals = [r["final_val_loss"] for r in base["per_seed"].values()]
            ax.set_ylim(min(finals) - 0.15, max(finals) + 1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (mean; band: min-max over seeds)")
        ax.set_title(f"{title}: {corpus}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 0.32 * n_arms + 1.8), squeeze=False)
    for ax, corpus in zip(axes[0], names):
        arms = corpora[corpus]["arms"]
        order = sorted(arms, key=lambda a: rank_key(arms[a]), reverse=True)
        vals = [arms[a]["steps_fraction_mean"] or 1.05 for a in order]
        errs = [arms[a]["steps_fraction_se"] or 0.0 for a in order]
        colors = ["#9ecae1" if arms[a]["n_seeds"] == 1 else "tab:blue" for a in order]
        ax.barh(range(len(order)), vals, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(range(len(order)), [f"{a} (n={arms[a]['n_seeds']})" for a in order], fontsize=7)
        ax.axvline(GOAL, color="tab:green", ls="--", lw=1, label=f"goal {GOAL}")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("steps to the baseline's final val loss ÷ the baseline's steps")
        ax.set_title(f"{corpus}: mean ± SE over seeds (pale: 1 seed; 1.05: not reached by every seed)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fractions.png", dpi=110)
    plt.close(fig)


def summary(r: dict) -> str:
    def f(v, fmt=".3f"):
        return "—" if v is None else format(v, fmt)

    lines = [f"SALT benchmark, profile {r['profile']}: {r['token_budget']:,} tokens per run, LLM "
             f"{r['sizes']['llm_params']:,} params, SLM {r['sizes']['slm_params']:,}; best arm: {r['best_arm']}"]
    for name, c in r["corpora"].items():
        lines += ["", f"### {name}: baseline overtakes the SLM at {f(c['crossover_fraction'], '.0%')} of the run "
                  f"(regime ok: {c['regime_ok']}); the goal needs a val lead of "
                  f"{f(c.get('val_lead_needed_for_goal'))} over the baseline at {GOAL:.0%} of the run", "",
                  "| arm | seeds | steps fraction | z vs SALT | final val loss | OOD val loss | cloze acc | "
                  "val lead at KD end / final |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, a in sorted(c["arms"].items(), key=lambda kv: rank_key(kv[1])):
            sf = f(a["steps_fraction_mean"]) + (f" ± {a['steps_fraction_se']:.3f}" if a["steps_fraction_se"] else "")
            lines.append(f"| {arm} | {a['n_seeds']} | {sf} | {f(a['steps_fraction_z_vs_salt'], '.1f')} | "
                         f"{f(a['final_val_loss_mean'], '.4f')} | {f(a['ood_val_loss_mean'], '.4f')} | "
                         f"{f(a['cloze_acc_mean'])} | {f(a.get('val_lead_at_kd_end_mean'))} / "
                         f"{f(a.get('val_lead_final_mean'))} |")
    lines += ["", f"KD step ÷ CE step: online {r['kd_step_ratio_online']}, cached {r['kd_step_ratio_cached']} "
              f"(FLOP limit {r['flop_limit']})"]
    if r.get("goal"):
        lines.append(f"goal (<= {GOAL} on both corpora, OOD not worse): {r['goal']}")
    if r.get("note"):
        lines += ["", r["note"]]
    return "\n".join(lines)
