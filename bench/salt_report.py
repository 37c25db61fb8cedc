"""How bench/salt.py's results read: each arm's statistics over seeds, the best recipe against the goal, the
ranking of arms, the markdown summary and the two figures. It takes the per-seed figures and curves bench/salt.py
measured, and reads no run directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from slm_assist.training.metrics import mean_se, paired_z

GOAL = 0.65  # steps fraction the best recipe must reach, mean over seeds, on both corpora
FIXED = ("baseline", "salt", "ls_control")  # in every table; the rest are levers


def rank_key(a: dict) -> tuple[float, float]:
    """Arms rank by steps fraction (never reaching the baseline ranks last), then by final validation loss."""
    f = a.get("steps_fraction_mean")
    return (math.inf if f is None else f, a["final_val_loss_mean"])


def summarise_arm(by_seed: dict[int, dict], salt_runs: dict[int, dict], base_runs: dict[int, dict]) -> dict:
    fr = [r["steps_fraction"] for r in by_seed.values()]
    reached = [f for f in fr if f is not None]
    sf = mean_se(reached) if len(reached) == len(fr) else (None, None)

    def stat(key: str) -> tuple[float, float | None]:
        return mean_se([r[key] for r in by_seed.values()])

    return {"n_seeds": len(by_seed), "pilot": len(by_seed) < 3,
            "steps_fraction_mean": sf[0], "steps_fraction_se": sf[1], "n_reached": len(reached),
            "final_val_loss_mean": stat("final_val_loss")[0], "final_val_loss_se": stat("final_val_loss")[1],
            "ood_val_loss_mean": stat("ood_val_loss")[0], "ood_val_loss_se": stat("ood_val_loss")[1],
            "cloze_acc_mean": stat("cloze_acc")[0], "cloze_acc_se": stat("cloze_acc")[1],
            "full_val_loss_mean": stat("full_val_loss")[0],
            "val_lead_at_kd_end_mean": stat("val_lead_at_kd_end")[0], "val_lead_final_mean": stat("val_lead_final")[0],
            "steps_fraction_z_vs_salt": paired_z(by_seed, salt_runs, "steps_fraction"),
            "final_val_loss_z_vs_salt": paired_z(by_seed, salt_runs, "final_val_loss"),
            "ood_val_loss_z_vs_baseline": paired_z(by_seed, base_runs, "ood_val_loss"),
            "per_seed": {str(s): {k: v for k, v in r.items() if k != "val_curve"} for s, r in by_seed.items()}}


def best_recipe(corpora: dict, confirm: list[str], seeds: int) -> tuple[str | None, dict | None]:
    """The confirmed recipe with the lowest steps fraction averaged over both corpora (every seed done on each),
    and how it stands against the goal: <= GOAL on both corpora and OOD not worse than the baseline (z > -2)."""
    best_arm, best = None, math.inf
    for a in confirm:
        if a in ("baseline", "ls_control"):
            continue
        per = [corpora[c]["arms"].get(a, {}) for c in corpora]
        fr = [x.get("steps_fraction_mean") for x in per]
        complete = len(corpora) == 2 and all(x.get("n_seeds", 0) >= seeds for x in per)
        if complete and None not in fr and float(np.mean(fr)) < best:
            best_arm, best = a, float(np.mean(fr))
    if best_arm is None:
        return None, None
    per = {c: corpora[c]["arms"][best_arm] for c in corpora}
    ood_ok = all((a["ood_val_loss_z_vs_baseline"] or 0) > -2 for a in per.values())
    return best_arm, {"target": GOAL, "steps_fraction_by_corpus": {c: a["steps_fraction_mean"] for c, a in per.items()},
                      "ood_not_worse": ood_ok, "met": ood_ok and all(a["steps_fraction_mean"] <= GOAL for a in per.values())}


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
