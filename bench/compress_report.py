"""How bench/compress.py's results read: FLOPs accounting (what each arm is charged), per-arm statistics over
seeds (task loss, gap recovered, z), the CE change across latent stages, tokens to match on the scratch curve, the
gap recovered against a scratch student of the same total FLOPs, the Pareto front, the speed ratio, the markdown
summary and the figure. Pure functions of the figures bench/compress.py measured; it reads no run directory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm_assist.training.metrics import mean_se, paired_z, steps_to_reach

# ---- FLOPs: 6·N per trained token, 2·N per forward-only token ---------------------------------------------------


def llama_params(shape: dict, vocab: int) -> int:
    """Parameters of the bench's Llamas (tied embeddings, no biases, as many KV heads as heads): the embedding,
    per block 4·d² attention + 3·d·ffn MLP + two norms, and the final norm."""
    d, f = shape["hidden_size"], shape["ffn_size"]
    return vocab * d + shape["num_layers"] * (4 * d * d + 3 * d * f + 2 * d) + d


@dataclass(frozen=True)
class Costs:
    """What a profile's FLOPs depend on besides each run's stages and student size."""

    n_teacher: int
    d_teacher: int
    vocab: int
    tokens_per_step: int
    calibration_tokens: int  # pruning's importance forwards through the teacher
    finetune_tokens: int  # the teacher's fine-tune on one task
    n_slm: int
    slm_tokens: int  # the SLM's own pretraining


def costs(p: dict) -> Costs:
    tokens = p["batch"] * p["seq"]
    return Costs(n_teacher=llama_params(p["teacher"], p["vocab"]), d_teacher=p["teacher"]["hidden_size"],
                 vocab=p["vocab"], tokens_per_step=tokens, calibration_tokens=p["calibration"] * p["seq"],
                 finetune_tokens=p["finetune_steps"] * tokens, n_slm=llama_params(p["students"]["fifth"], p["vocab"]),
                 slm_tokens=p["slm_steps"] * tokens)


def stage_flops(stage: dict, n_student: int, c: Costs) -> dict[str, float]:
    """One stage: the student's training, the teacher's forwards when it distils, and the logit-space last-layer
    term (the student's state read out through the teacher's head, forward and backward: ~6·d_teacher·V a token)."""
    tokens = stage["max_steps"] * c.tokens_per_step
    loss = stage["loss"]
    head = bool(loss.get("hidden")) and loss.get("last_layer") == "logits"
    return {"student": 6.0 * n_student * tokens,
            "teacher": 2.0 * c.n_teacher * tokens if stage["teacher"] != "none" else 0.0,
            "head": 6.0 * c.d_teacher * c.vocab * tokens if head else 0.0}


def slm_flops(c: Costs) -> float:
    return 6.0 * c.n_slm * c.slm_tokens


def gd_steps(latent: dict, n_student: int, c: Costs) -> int:
    """GD steps whose FLOPs equal the SLM's pretraining: the general student is the SLM init's like-for-like rival."""
    one = stage_flops({"max_steps": 1, "teacher": "pretrained", "loss": latent}, n_student, c)
    return max(1, round(slm_flops(c) / sum(one.values())))


def run_flops(stages: list[dict], n_student: int, c: Costs, init: str, source: str = "pretrained",
              general: float = 0.0) -> dict[str, float]:
    """The full charge of one run: its stages; pruning's calibration (init prune); the teacher's task fine-tune
    when a stage distils from it or the student is pruned from it; the general student it starts from, all of it
    (`general`: that run's own total); the SLM's pretraining (init slm)."""
    out = dict.fromkeys(("student", "teacher", "head", "calibration", "finetune", "general", "slm"), 0.0)
    for s in stages:
        for k, v in stage_flops(s, n_student, c).items():
            out[k] += v
    if init == "prune":
        out["calibration"] = 2.0 * c.n_teacher * c.calibration_tokens
    if source == "finetuned" or any(s["teacher"] == "finetuned" for s in stages):
        out["finetune"] = 6.0 * c.n_teacher * c.finetune_tokens
    out["general"] = general
    if init == "slm":
        out["slm"] = slm_flops(c)
    out["total"] = sum(out.values())
    return out


# ---- statistics over seeds --------------------------------------------------------------------------------------

def gap(loss: float, scratch: float, teacher: float) -> float | None:
    """The share of the scratch student's gap to the fine-tuned teacher that `loss` closes."""
    return (scratch - loss) / (scratch - teacher) if scratch > teacher else None


def arm_row(by_seed: dict[int, dict], scratch: float | None, teacher: float) -> dict:
    """An arm on one task: mean ± s.e. over seeds of task loss, gap recovered (per seed, against the scratch
    mean), cloze accuracy and general loss (forgetting)."""
    def stat(key: str) -> tuple[float, float | None]:
        return mean_se([r[key] for r in by_seed.values()])

    gaps = [g for r in by_seed.values() if scratch is not None and (g := gap(r["task_val_loss"], scratch, teacher))
            is not None]
    g = mean_se(gaps) if gaps else (None, None)
    return {"n_seeds": len(by_seed), "task_val_loss_mean": stat("task_val_loss")[0],
            "task_val_loss_se": stat("task_val_loss")[1], "gap_recovered_mean": g[0], "gap_recovered_se": g[1],
            "cloze_acc_mean": stat("cloze_acc")[0], "cloze_acc_se": stat("cloze_acc")[1],
            "general_val_loss_mean": stat("general_val_loss")[0], "params": next(iter(by_seed.values()))["params"],
            "pilot": len(by_seed) < 3, "per_seed": {str(s): r for s, r in by_seed.items()}}


def z(runs: dict[str, dict[int, dict]], better: str, worse: str) -> float | None:
    """Paired by seed (the seed sets the data order every arm shares); positive = `better` has the lower task loss.
    None below two common seeds."""
    if better not in runs or worse not in runs:
        return None
    return paired_z(runs[better], runs[worse], "task_val_loss")


def latent_changes(points: dict[int, dict[str, float]]) -> dict[str, dict]:
    """Task CE change across each latent stage, mean ± s.e. over seeds. `points`: per seed, the task loss at
    "init" and after each stage up to the last latent one, in order; a stage's change is its loss minus the one
    before it."""
    diffs: dict[str, list[float]] = {}
    for p in points.values():
        names = list(p)
        for prev, name in zip(names, names[1:]):
            diffs.setdefault(name, []).append(p[name] - p[prev])
    return {k: {"ce_change_mean": mean_se(d)[0], "ce_change_se": mean_se(d)[1], "n_seeds": len(d)} for k, d in diffs.items()}


# ---- the Minitron view and the full charge --------------------------------------------------------------------

def running_min(xs: list[float]) -> list[float]:
    """The scratch curve as a budget that may stop early: scarce task data makes long runs overfit."""
    out, best = [], math.inf
    for x in xs:
        best = min(best, x)
        out.append(best)
    return out


def tokens_to_match(loss: float, multiples: list[float], losses: list[float]) -> float | str:
    """The multiple of the scratch student's tokens at which the scratch curve (mean losses at increasing
    `multiples`, running minimum) reaches `loss`, linear in log(tokens). The first multiple (1.0) when the arm is
    no better than 1x scratch; the string ">16" (">" + the largest multiple) when no scratch run reaches it."""
    curve = [(math.log2(m), x) for m, x in zip(multiples, running_min(losses))]
    at = steps_to_reach(curve, loss)
    return f">{multiples[-1]:g}" if at is None else 2.0 ** at


def scratch_loss_at(flops: float, scratch_flops: list[float], losses: list[float]) -> tuple[float, bool]:
    """The scratch student's loss at `flops` (log-linear on the running minimum); True when `flops` is past the
    longest scratch run, whose loss then stands in (clipped)."""
    ys = running_min(losses)
    return float(np.interp(math.log(flops), np.log(scratch_flops), ys)), flops > scratch_flops[-1]


def charged_gap(loss: float, flops: float, scratch_flops: list[float], scratch_losses: list[float],
                teacher: float) -> tuple[float | None, bool, float]:
    """Gap recovered when the reference scratch student is given the arm's total FLOPs (None when that student
    already beats the teacher: no gap left to recover); whether clipped; the reference's loss."""
    ref, clipped = scratch_loss_at(flops, scratch_flops, scratch_losses)
    return gap(loss, ref, teacher), clipped, ref


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The (FLOPs, loss) points no other point beats on both, cheapest first."""
    front, best = [], math.inf
    for name, (_, loss) in sorted(points.items(), key=lambda kv: kv[1]):
        if loss < best:
            front.append(name)
            best = loss
    return front


def speed_ratio(teacher_s: list[float], student_s: list[float]) -> tuple[float, float | None]:
    """Student ÷ teacher batched throughput, one ratio per side-by-side round (noise common to a round cancels)."""
    return mean_se([t / s for t, s in zip(teacher_s, student_s)])


def speed_rounds(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor, rounds: int) -> dict:
    """A batched forward of the teacher, then of the student, `rounds` times: the ratio measured side by side
    (this VM's speed drifts between runs by more than the ratio's noise)."""
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    with torch.inference_mode():
        for m in (teacher, student):
            m(input_ids=ids)  # warm-up
        for _ in range(rounds):
            for name, m in (("teacher", teacher), ("student", student)):
                t0 = time.perf_counter()
                m(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
    mean, se = speed_ratio(times["teacher"], times["student"])
    return {"ratio_mean": mean, "ratio_se": se, "rounds": rounds, "batch": ids.shape[0], "seq_len": ids.shape[1],
            **{k: {"batched_tokens_per_s": ids.numel() / float(np.median(v)), "seconds": v} for k, v in times.items()}}


def minitron_view(table: dict[str, dict], multiples: list[int], tokens_per_run: int) -> dict:
    """The scratch curve (multiples with results) and every other arm's tokens to match."""
    pts = [(k, table[f"scratch_x{k}" if k > 1 else "scratch"]) for k in multiples
           if (f"scratch_x{k}" if k > 1 else "scratch") in table]
    curve = [{"multiple": k, "tokens": k * tokens_per_run, "task_val_loss_mean": r["task_val_loss_mean"],
              "task_val_loss_se": r["task_val_loss_se"], "n_seeds": r["n_seeds"]} for k, r in pts]
    mins = running_min([c["task_val_loss_mean"] for c in curve])
    for c, m in zip(curve, mins):
        c["running_min"] = m
    match = {a: tokens_to_match(r["task_val_loss_mean"], [k for k, _ in pts], [c["task_val_loss_mean"] for c in curve])
             for a, r in table.items() if not a.startswith("scratch_x")} if pts else {}
    return {"scratch_curve": curve, "tokens_to_match": match}


# ---- the result ------------------------------------------------------------------------------------------------

COMPARISONS = {  # name: (better, worse) on perl; positive z = the first arm has the lower task loss
    "gd_tsd_vs_slm_z": ("gd_tsd", "slm"), "prune_finetuned_vs_pretrained_z": ("tsd_only_ft_source", "tsd_only"),
    "calibration_task_vs_general_z": ("tsd_only_task_calib", "tsd_only"), "width_vs_both_z": ("prune_width", "prune_both"),
    "tad_tsd_vs_tsd_only_z": ("tad_tsd", "tsd_only")}


def build(runs: dict[str, dict[str, dict[int, dict]]], teachers: dict[str, dict], meta: dict[str, dict],
          multiples: list[int], latent: dict, general: dict, speed: dict | None, p: dict) -> dict:
    """The three views from every finished run's evaluation. `runs[task][arm][seed]`: evaluations; `teachers[task]`:
    the fine-tuned and pretrained teachers'; `meta[arm]`: group (amortised, control, sweep, prune, curve),
    same_size (the main student's shape), base (a sweep arm's default-weight arm) and flops (its full charge on
    perl); `latent[run][task][stage]`: CE changes; `general`: the general students' flops and steps by hidden
    weight, the SLM's pretraining flops and the default weight; `speed`: the side-by-side speed rounds; `p`: the
    profile."""
    tokens = p["batch"] * p["seq"]
    tables = {}
    for task, by_arm in runs.items():
        scratch = mean_se([r["task_val_loss"] for r in by_arm["scratch"].values()])[0] if by_arm.get("scratch") else None
        tables[task] = {a: arm_row(by_arm[a], scratch, teachers[task]["finetuned"]["task_val_loss"])
                        for a in meta if by_arm.get(a)}  # in the arms' order
    perl, teacher = tables.get("perl", {}), teachers["perl"]["finetuned"]["task_val_loss"]
    for a, row in perl.items():
        row["flops"] = meta[a]["flops"]["total"]
        row["teacher_flops"] = meta[a]["flops"]["teacher"]
    mv = minitron_view(perl, multiples, p["budget"] * tokens)
    curve = mv["scratch_curve"]
    charged, clipped, advantage = {}, {}, {}
    for a, row in perl.items():
        row["tokens_to_match"] = mv["tokens_to_match"].get(a)
        if curve:
            flops = [perl["scratch" if c["multiple"] == 1 else f"scratch_x{c['multiple']}"]["flops"] for c in curve]
            charged[a], clipped[a], ref = charged_gap(row["task_val_loss_mean"], row["flops"], flops,
                                                      [c["task_val_loss_mean"] for c in curve], teacher)
            row["gap_recovered_charged"], row["charged_reference_clipped"] = charged[a], clipped[a]
            # nats ahead of the scratch student given the same FLOPs: defined even where that student beats the teacher
            row["charged_reference_loss"], advantage[a] = ref, ref - row["task_val_loss_mean"]
            row["loss_advantage_charged"] = advantage[a]
    # the best arm at the main student's size (the ~0.3 students are larger); scratch runs are the reference
    rivals = [a for a in perl if meta[a]["same_size"] and meta[a]["group"] != "curve" and a != "scratch"]
    best = min(rivals, key=lambda a: perl[a]["task_val_loss_mean"]) if rivals else None
    scored = [a for a in rivals if charged.get(a) is not None]
    best_charged = max(scored, key=lambda a: charged[a]) if scored else None
    best_adv = max((a for a in rivals if a in advantage), key=lambda a: advantage[a], default=None)
    runs_perl = runs.get("perl", {})
    margin = (perl["scratch"]["task_val_loss_mean"] - teacher) if "scratch" in perl else None
    am_arms = [a for a in meta if meta[a]["group"] == "amortised"]
    gd = latent.get(f"general_h{general['default']}", {}).get("perl", {}).get("gd", {})
    return {
        "best_arm": best, "best_gap_recovered": perl[best]["gap_recovered_mean"] if best else None,
        "progressive_vs_tsd_only_z": z(runs_perl, "progressive", "tsd_only"),
        "progressive_vs_single_stage_z": z(runs_perl, "progressive", "single_stage"),
        "pruned_vs_random_z": z(runs_perl, "tsd_only", "tsd_only_random"),
        "width_vs_depth_z": z(runs_perl, "prune_width", "prune_depth"),
        "comparisons": {**{k: z(runs_perl, *ab) for k, ab in COMPARISONS.items()},
                        **{f"{a}_vs_{meta[a]['base']}_z": z(runs_perl, a, meta[a]["base"]) for a in meta
                           if meta[a]["group"] == "sweep"}},
        "teacher_margin_over_scratch": margin,
        "teacher_margin_ok": bool(margin is not None and margin > 0
                                  and margin > 2 * (perl["scratch"]["task_val_loss_se"] or 0.0)),
        "arms": perl,
        "amortised": {
            "arms": {a: {t: {k: tables[t][a][k] for k in ("task_val_loss_mean", "task_val_loss_se", "gap_recovered_mean",
                                                        "gap_recovered_se", "n_seeds", "cloze_acc_mean",
                                                        "general_val_loss_mean")}
                         for t in tables if a in tables[t]} for a in am_arms},
            "progressive_vs_tsd_only_z": {t: z(runs[t], "progressive", "tsd_only") for t in runs},
            "tasks": {t: {"teacher_task_val_loss": teachers[t]["finetuned"]["task_val_loss"],
                          "pretrained_teacher_task_val_loss": teachers[t]["pretrained"]["task_val_loss"],
                          "teacher_margin_over_scratch": (tables[t]["scratch"]["task_val_loss_mean"]
                                                          - teachers[t]["finetuned"]["task_val_loss"])
                          if "scratch" in tables[t] else None} for t in tables},
            "general_student_flops": general["flops"][general["default"]],
            "general_student_flops_by_hidden": general["flops"], "general_student_steps": general["steps"],
            "slm_pretrain_flops": general["slm_pretrain_flops"]},
        "latent_stage_ce_change": gd.get("ce_change_mean"), "latent_stage_ce_change_se": gd.get("ce_change_se"),
        "latent_stages": latent,
        "student_speedup_batched": speed["ratio_mean"] if speed else None,
        "student_speedup_batched_se": speed["ratio_se"] if speed else None,
        "tokens_to_match": mv["tokens_to_match"],
        "tokens_to_match_best": mv["tokens_to_match"].get(best) if best else None,
        "scratch_curve": curve,
        "flops": {a: row["flops"] for a, row in perl.items()},
        "flops_breakdown": {a: meta[a]["flops"] for a in perl},
        "best_arm_charged": best_charged,
        "best_gap_recovered_charged": charged[best_charged] if best_charged else None,
        "charged_reference_clipped": bool(best_charged and clipped[best_charged]),
        "best_arm_advantage_charged": best_adv,
        "best_loss_advantage_charged": advantage[best_adv] if best_adv else None,
        # the scratch budget that reaches the fine-tuned teacher: no student distilled from it is likely to match
        # much more than this, since distillation pulls towards the teacher
        "teacher_tokens_to_match": tokens_to_match(teacher, [c["multiple"] for c in curve],
                                                   [c["task_val_loss_mean"] for c in curve]) if curve else None,
        "pareto_front": pareto_front({a: (row["flops"], row["task_val_loss_mean"]) for a, row in perl.items()}),
        "best_recipe_for_init_ablation": "tsd_only",  # the pruning and init arms all run TSD
        "teacher": teachers["perl"], "teacher_tasks": teachers, "speed": speed,
        "student_budget": {"steps": p["budget"], "tokens": p["budget"] * tokens},
        "teacher_budget": {"pretrain_steps": p["teacher_steps"], "finetune_steps": p["finetune_steps"]},
        "sizes": {"teacher": p["teacher"], "student": p["students"]["fifth"], "students": p["students"],
                  "params": {k: llama_params(v, p["vocab"]) for k, v in {"teacher": p["teacher"], **p["students"]}.items()}},
        "profile_settings": {k: v for k, v in p.items() if k not in ("teacher", "students")},
        **({"note": "TEST SCALE: tiny models, a few dozen steps, one seed (pilot); the figures check that every arm "
                    "and view runs and say nothing about compression."} if p.get("test_scale") else {})}


# ---- the summary ------------------------------------------------------------------------------------------------

def _f(v, fmt: str = ".4f") -> str:
    return "—" if v is None else v if isinstance(v, str) else format(v, fmt)


def summary(r: dict) -> str:
    t = r["teacher"]
    lines = [f"compression benchmark (issue 25), profile {r['profile']}, seeds {r['seeds']}: fine-tuned teacher perl "
             f"task loss {t['finetuned']['task_val_loss']:.4f} (pretrained {t['pretrained']['task_val_loss']:.4f}); "
             f"margin over scratch {_f(r['teacher_margin_over_scratch'])} (ok: {r['teacher_margin_ok']})", "",
             "perl, every arm (total FLOPs = the full charge; charged gap: scratch given those FLOPs):", "",
             "| arm | seeds | task val loss | gap recovered | charged gap | tokens to match | cloze | general loss | "
             "params | TFLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        tm = a.get("tokens_to_match")
        lines.append(
            f"| {name}{' (pilot)' if a['pilot'] else ''} | {a['n_seeds']} | {_f(a['task_val_loss_mean'])} ± "
            f"{_f(a['task_val_loss_se'])} | {_f(a['gap_recovered_mean'], '.3f')} ± {_f(a['gap_recovered_se'], '.3f')} "
            f"| {_f(a.get('gap_recovered_charged'), '.3f')} | {_f(tm, '.2f')} | {_f(a['cloze_acc_mean'], '.3f')} | "
            f"{_f(a['general_val_loss_mean'])} | {a['params'] / 1e6:.2f}M | {_f(a.get('flops', 0) / 1e12, '.2f')} |")
    am = r["amortised"]
    tasks = list(am["tasks"])
    lines += ["", f"amortised (general student made once per seed, {am['general_student_flops'] / 1e12:.2f} TFLOPs, "
              "not charged):", "", "| arm | " + " | ".join(f"{x} loss | {x} gap" for x in tasks) + " |",
              "|---|" + "---|---|" * len(tasks)]
    for name, by_task in am["arms"].items():
        cells = [f"{_f(c['task_val_loss_mean'])} ± {_f(c['task_val_loss_se'])} | {_f(c['gap_recovered_mean'], '.3f')}"
                 if (c := by_task.get(x)) else "— | —" for x in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    zs = ", ".join(f"{x} {_f(v, '.2f')}" for x, v in am["progressive_vs_tsd_only_z"].items())
    curve = ", ".join(f"{c['multiple']}x {c['task_val_loss_mean']:.4f}" for c in r["scratch_curve"])
    lines += ["", f"scratch curve (perl): {curve}; best arm matches {_f(r['tokens_to_match_best'], '.2f')}x scratch "
              "tokens", f"best arm {r['best_arm']}: gap {_f(r['best_gap_recovered'], '.3f')}; charged: "
              f"{_f(r['best_arm_charged'])} {_f(r['best_gap_recovered_charged'], '.3f')}"
              f"{' (past the 16x scratch run: clipped)' if r['charged_reference_clipped'] else ''}; ahead of scratch "
              f"at equal FLOPs: {_f(r['best_arm_advantage_charged'])} by {_f(r['best_loss_advantage_charged'])} nats; "
              f"scratch reaches the teacher at {_f(r['teacher_tokens_to_match'], '.2f')}x; Pareto front "
              f"{r['pareto_front']}", f"z (positive = the first is better): progressive vs tsd_only {zs}; vs "
              f"single_stage {_f(r['progressive_vs_single_stage_z'], '.2f')}; pruned vs random "
              f"{_f(r['pruned_vs_random_z'], '.2f')}; width vs depth {_f(r['width_vs_depth_z'], '.2f')}; "
              + ", ".join(f"{k} {_f(v, '.2f')}" for k, v in r["comparisons"].items()),
              f"latent stage CE change (GD, default latent loss, perl): {_f(r['latent_stage_ce_change'])} (goal <= 0); "
              f"student speed {_f(r['student_speedup_batched'], '.2f')} ± {_f(r['student_speedup_batched_se'], '.2f')}"
              "x the teacher's"]
    if "note" in r:
        lines += ["", r["note"]]
    return "\n".join(lines)


def plot(r: dict, path: Path, title: str) -> None:
    """Left: perl task loss vs total FLOPs (every arm, the scratch curve, the Pareto front ringed). Right: the
    amortised arms' gap recovered on each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    arms = r["arms"]
    curve = [(arms[n]["flops"], arms[n]["task_val_loss_mean"]) for n in arms if n == "scratch" or n.startswith("scratch_x")]
    if curve:
        xs, ys = zip(*sorted(curve))
        ax.plot(xs, ys, "o--", color="gray", label="scratch 1x..16x")
        ax.plot(xs, running_min(list(ys)), "-", color="gray", alpha=0.4, label="scratch, running min")
    for n, a in arms.items():
        if n != "scratch" and not n.startswith("scratch_x"):
            ax.errorbar(a["flops"], a["task_val_loss_mean"], yerr=a["task_val_loss_se"] or 0, fmt="o", ms=4, capsize=2)
            ax.annotate(n, (a["flops"], a["task_val_loss_mean"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    front = [(arms[n]["flops"], arms[n]["task_val_loss_mean"]) for n in r["pareto_front"]]
    if front:
        ax.plot(*zip(*front), "s", mfc="none", mec="tab:red", ms=10, label="Pareto front")
    ax.axhline(r["teacher"]["finetuned"]["task_val_loss"], color="tab:red", ls=":", label="fine-tuned teacher")
    ax.set(xscale="log", xlabel="total FLOPs (full charge)", ylabel="perl task validation loss",
           title="task loss vs total FLOPs")
    ax.legend(fontsize=7)
    am, tasks = r["amortised"]["arms"], list(r["amortised"]["tasks"])
    names = list(am)
    for i, task in enumerate(tasks):
        g = [(am[n].get(task) or {}).get("gap_recovered_mean") or 0.0 for n in names]
        e = [(am[n].get(task) or {}).get("gap_recovered_se") or 0.0 for n in names]
        ax_b.bar(np.arange(len(names)) + i * 0.4, g, 0.4, yerr=e, capsize=2, label=task)
    ax_b.set_xticks(np.arange(len(names)) + 0.2, names, rotation=30, ha="right", fontsize=8)
    ax_b.axhline(0, color="black", lw=0.5)
    ax_b.set(title="amortised view: gap recovered (mean ± s.e.)")
    ax_b.legend()
    for a in (ax, ax_b):
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
