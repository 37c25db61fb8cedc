"""SALT benchmark (issue 13): does a small LM's help make the larger LM reach its baseline's quality in fewer steps,
which of the seed papers' levers add to it, and does it hold over seeds and corpora?

Every run trains the same LLM on the same token budget; the seed sets model init and data order. Two phases:

  screen   every arm below, seed 0, on train_pydoc (one seed: a pilot, labelled so)
  confirm  baseline, salt, ls_control and the screen's best levers (the top two alone and the best compatible
           combination), seeds 0..2 on train_pydoc and train_linuxdoc

Arms: baseline (CE); salt (the paper: forward KL, tau 1, w 0.667 for the first 20% of steps); ls_control (the
same schedule with a label-smoothed one-hot instead of the SLM: the part that is regularisation); salt_ds (KD
phase on the SALT_DS subset); gate_topk / gate_confidence (token gating); handover; ensemble_mean /
ensemble_vote (three SLMs of different seeds); curriculum (KD phase easy to hard by SLM loss); cl_filter (KD
phase without the 10% most confidently-wrong sequences); z_loss; tau / w / n_KD sweeps; KD kinds at the best w.

Reported per corpus and arm: the fraction of the baseline's steps needed to reach the baseline's final validation
loss (per seed, then mean ± standard error), final and OOD validation loss (train_perldoc), last-word cloze
accuracy (>= 1000 held-out items), and z against SALT (paired by seed). The paper's regime is checked: the
baseline must overtake the SLM within the first 60% of the run, or the benchmark exits non-zero.

    python bench/salt.py            # full profile (~6 CPU-hours on 2 cores) -> bench/results/salt.json
    python bench/salt.py --quick    # <= 10 min, test scale
    python bench/salt.py --phase screen   # only the screen; a later run adds the confirm phase
    python bench/salt.py --report-only    # results and plots of the runs finished so far (a sweep in progress)

Finished runs and their evaluations are reused (a killed run resumes from its checkpoint), so the sweep may span
sessions; --seeds N adds seeds to the confirm phase; --fresh starts the profile over. --jobs N (default 2) trains N
runs side by side with cpu_count / N threads each (bench/parallel.py), each logging to <run_dir>.log.
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

import numpy as np
import torch
from parallel import LOCK, Jobs, run_module, threads_per_job  # bench/parallel.py, next to this script
from salt_report import FIXED, GOAL, best_recipe, plot, rank_key, summarise_arm, summary

from data_tools.corpus import joined_documents, write_jsonl
from slm_assist.core.dataset import load_split, read_manifest
from slm_assist.core.files import atomic_write_text
from slm_assist.core.scores import ScoresDir
from slm_assist.eval import cloze_accuracy, dataset_loss, load_model
from slm_assist.training.metrics import mean_se, steps_to_reach, val_curve

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
MAIN_CORPORA = {"pydoc": CORPORA / "train_pydoc.txt.gz", "linuxdoc": CORPORA / "train_linuxdoc.txt.gz"}
OOD_CORPUS = CORPORA / "train_perldoc.txt.gz"
REGIME = 0.6  # the baseline must overtake the SLM within this fraction of the run
N_KD = 0.2  # the paper's KD phase: the first 20% of steps

_SLM = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=172, lr=3e-3)
PROFILES = {
    # 3.4M-param LLM, 800 steps of 8 x 256 tokens (1.6M tokens): ~6 min a run, 51 runs in ~6 h. The SLM (0.37M)
    # trains half the LLM's steps, so the baseline overtakes it early: the paper's regime by construction.
    "full": dict(vocab=4096, seq=256, batch=8, steps=800, warmup=40, eval_every=40, eval_batches=16,
                 corpus_chars=12_000_000, val_fraction=0.08, ood_chars=2_000_000, cloze=1000, ood_rows=256, seeds=3, ensemble=3,
                 slm=_SLM, slm_steps=400, llm=dict(hidden_size=192, num_layers=6, num_heads=3, ffn_size=512, lr=2e-3),
                 singles=2, combo=3, kd_rounds=4, kd_steps=4),
    # Test scale: every arm, phase and figure in a few minutes; the figures say nothing about SALT.
    "quick": dict(vocab=1024, seq=64, batch=8, steps=40, warmup=4, eval_every=10, eval_batches=4,
                  corpus_chars=250_000, val_fraction=0.2, ood_chars=100_000, cloze=50, ood_rows=32, seeds=2, ensemble=2,
                  slm=dict(_SLM, hidden_size=32, ffn_size=86), slm_steps=20,
                  llm=dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=172, lr=3e-3),
                  singles=1, combo=2, kd_rounds=1, kd_steps=2),
}


def salt(c: dict, **extra) -> dict:
    """The paper's recipe (SALT's step schedule, forward KL at tau 1) plus `extra` settings."""
    return {"distill.source.kind": "teacher", "distill.source.teachers": [c["slm"]], "distill.schedule.kind": "step",
            "distill.schedule.weight": 0.667, "distill.schedule.n_kd_fraction": N_KD, **extra}


ARMS = {
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


def run(*cmd: str) -> None:
    run_module(REPO, *cmd)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ---- per-corpus setup: data, SLMs, scores, selections ---------------------------------------------------------

def model_overrides(size: dict, p: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in size.items() if k != "lr"] + [
        f"optim.lr={size['lr']}", f"model.max_position_embeddings={p['seq']}"]


def train(run_dir: Path, p: dict, data: Path, size: dict, steps: int, seed: int, extra: dict,
          threads: int = 0) -> float:
    """Train one run (or reuse it when finished); returns the wall time its training took. `threads` > 0: a run
    side by side with others, with that many threads and its output in `run_dir`.log."""
    walls_file = run_dir.parent.parent / "wall_s.json"
    walls, key = _json(walls_file), f"{run_dir.parent.name}/{run_dir.name}"
    if (run_dir / "final" / "config.json").is_file() and key in walls:
        return walls[key]
    t0 = time.time()
    sets = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in extra.items()]
    sets += [f"train.torch_threads={threads}"] if threads else []
    run_module(REPO, "slm_assist.train", str(REPO / "configs/demo/llm.yaml"), f"run_dir={run_dir}",
               f"data.path={data}", f"seed={seed}", f"data.seed={seed}", f"train.max_steps={steps}",
               f"train.micro_batch_size={p['batch']}", f"train.eval_every={p['eval_every']}",
               f"train.eval_batches={p['eval_batches']}", f"schedule.warmup_steps={p['warmup']}",
               f"checkpoint.every={steps // 4}", *model_overrides(size, p), *sets,
               log=run_dir.with_suffix(".log") if threads else None)
    wall = round(time.time() - t0, 1)
    with LOCK:  # re-read: side-by-side runs share this file
        walls = _json(walls_file)
        walls[key] = wall
        _save(walls_file, walls)
    return wall


@torch.inference_mode()
def mean_target_prob(model_dir: Path, data: Path, rows: int = 64) -> float:
    """The SLM's mean probability of the true next token: 1 minus it sets the control's smoothing, so the
    smoothed one-hot is as soft as the SLM's labels on average."""
    model, tok = load_model(model_dir, torch.device("cpu"))
    ids = torch.tensor(np.asarray(load_split(data, "validation")[:rows]["input_ids"], dtype=np.int64))
    logp = model(input_ids=ids).logits[:, :-1, : len(tok)].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).exp().mean().item()


def prepare(corpus: str, p: dict, work: Path) -> dict:
    """The corpus packed (its own tokenizer, ~2000-char documents), the OOD corpus with that tokenizer, a cloze set
    from held-out documents, the SLM and its ensemble partners, the SLM's scores and the two KD-phase subsets."""
    w = work / corpus
    w.mkdir(parents=True, exist_ok=True)
    data, ood, cloze = w / "data", w / "ood", w / "cloze.jsonl"
    pack = [str(REPO / "configs/demo/data.yaml"), "overwrite=true", f"pack.seq_len={p['seq']}"]
    if not (data / "manifest.json").is_file():
        write_jsonl(w / "corpus.jsonl", joined_documents([MAIN_CORPORA[corpus]], p["corpus_chars"]))
        run("data_tools.pack", *pack, f"out_dir={data}", f"corpus.paths=[{w / 'corpus.jsonl'}]",
            f"tokenizer.vocab_size={p['vocab']}", f"pack.val_fraction={p['val_fraction']}")
    if not (ood / "manifest.json").is_file():
        write_jsonl(w / "ood.jsonl", joined_documents([OOD_CORPUS], p["ood_chars"]))
        run("data_tools.pack", *pack, f"out_dir={ood}", f"corpus.paths=[{w / 'ood.jsonl'}]",
            f"tokenizer.path={data / 'tokenizer'}", "pack.val_fraction=0.1")
    if not cloze.is_file():
        run("data_tools.cloze", str(data), str(cloze), "--examples", str(p["cloze"]))
    n = sum(1 for _ in cloze.open())
    if n < p["cloze"]:
        sys.exit(f"error: {cloze}: only {n} cloze items from the held-out documents, fewer than {p['cloze']}")
    slms = [w / "slm" / f"seed{s}" for s in range(p["ensemble"])]
    for s, d in enumerate(slms):
        train(d, p, data, p["slm"], p["slm_steps"], s, {})
    scores, select = w / "scores", {"salt_ds": w / "select_salt_ds", "cl": w / "select_cl"}
    if not (scores / "manifest.json").is_file():
        run("data_tools.score", str(REPO / "configs/demo/score.yaml"), f"model={slms[0] / 'final'}", f"data={data}",
            f"out_dir={scores}", "overwrite=true")
    if not (select["salt_ds"] / "index.npy").is_file():
        run("data_tools.select", str(REPO / "configs/demo/select.yaml"), f"scores={scores}",
            f"out_dir={select['salt_ds']}", "overwrite=true")
    flags = ScoresDir.open(scores, "scores").columns()["confident_wrong"]
    cl_cut = float(np.percentile(flags, 90))  # the 10% most confidently-wrong sequences are left out
    if not (select["cl"] / "index.npy").is_file():
        run("data_tools.select", str(REPO / "configs/demo/select.yaml"), f"scores={scores}", f"out_dir={select['cl']}",
            "overwrite=true", "policy=random", "fraction=1.0", f"max_confident_wrong={cl_cut!r}")
    eps_file = w / "ls_eps.json"
    if not eps_file.is_file():
        _save(eps_file, {"eps": round(1 - mean_target_prob(slms[0] / "final", data), 3)})
    return {"corpus": corpus, "p": p, "work": w, "data": data, "ood": ood, "cloze": cloze,
            "slm": str(slms[0] / "final"), "slm_dir": slms[0], "ensemble": [str(d / "final") for d in slms[1:]],
            "scores": str(scores), "select": {k: str(v / "index.npy") for k, v in select.items()},
            "cl_cut": cl_cut, "cl_flagged": _json(select["cl"] / "selection.json").get("flagged"),
            "eps": _json(eps_file)["eps"], "best_w": 0.667}


# ---- runs and their figures ------------------------------------------------------------------------------------

def evaluate(ctx: dict, arm: str, seed: int) -> dict:
    """Final figures of one run, cached next to the corpus's runs."""
    cache_file, key = ctx["work"] / "evals.json", f"{arm}/seed{seed}"
    with LOCK:  # one evaluation at a time, beside the runs still training
        evals = _json(cache_file)
        if key not in evals:
            p, run_dir = ctx["p"], ctx["work"] / arm / f"seed{seed}"
            model, tok = load_model(run_dir / "final", torch.device("cpu"))
            evals[key] = {"full_val_loss": dataset_loss(model, tok, ctx["data"])["loss"],
                          "ood_val_loss": dataset_loss(model, tok, ctx["ood"], max_rows=p["ood_rows"])["loss"],
                          "cloze_acc": cloze_accuracy(model, tok, ctx["cloze"])["accuracy"]}
            _save(cache_file, evals)
        return evals[key]


def run_arm(ctx: dict, arm: str, seed: int, overrides: dict) -> None:
    p = ctx["p"]
    train(ctx["work"] / arm / f"seed{seed}", p, ctx["data"], p["llm"], p["steps"], seed, overrides, ctx["threads"])
    evaluate(ctx, arm, seed)


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
    """Per finished seed of `arm`: its curve and evaluation, and the steps fraction against the same seed's
    baseline final validation loss."""
    out = {}
    for d in sorted(p for p in (ctx["work"] / arm).glob("seed*") if p.is_dir()):  # not the runs' .log files
        seed = int(d.name[4:])
        base = ctx["work"] / "baseline" / d.name
        if not (d / "final" / "config.json").is_file() or not (base / "final" / "config.json").is_file():
            continue
        ev = _json(ctx["work"] / "evals.json").get(f"{arm}/{d.name}")
        if ev is None:
            continue
        curve, base_curve = val_curve(d), val_curve(base)
        reach, steps = steps_to_reach(curve, base_curve[-1][1]), ctx["p"]["steps"]
        out[seed] = {"final_val_loss": curve[-1][1], "steps_fraction": None if reach is None else reach / steps,
                     # how far ahead of the same seed's baseline: where SALT's KD phase ends, and at the end
                     "val_lead_at_kd_end": _at(base_curve, N_KD * steps) - _at(curve, N_KD * steps),
                     "val_lead_final": base_curve[-1][1] - curve[-1][1],
                     **ev, "wall_s": _json(ctx["work"] / "wall_s.json").get(f"{arm}/{d.name}"), "val_curve": curve}
    return out


def _at(curve: list[tuple[int, float]], step: float) -> float:
    """The validation loss at `step`, interpolated between evaluations."""
    return float(np.interp(step, *zip(*curve)))


# ---- the confirm plan ------------------------------------------------------------------------------------------

def combine(arms: list[str], ctx: dict) -> dict | None:
    """SALT with several levers at once (each lever's settings that differ from SALT's), or None when two of them
    set the same key differently."""
    base, own = salt(ctx), {}
    for arm in arms:
        for k, v in ARMS[arm](ctx).items():
            if base.get(k) == v:
                continue
            if k in own and own[k] != v:
                return None
            own[k] = v
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


def arm_settings(arm: str, ctx: dict) -> dict:
    if arm.startswith("combo-"):
        return combine(arm[len("combo-"):].split("+"), ctx)
    return ARMS[arm](ctx)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="<= 10 min test-scale profile")
    ap.add_argument("--phase", choices=("screen", "confirm", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=0, help="confirm-phase seeds (default: the profile's, >= 3 full)")
    ap.add_argument("--fresh", action="store_true", help="delete this profile's earlier runs first")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs side by side, each with cpu_count / jobs threads and its log in <run_dir>.log")
    ap.add_argument("--skip-memory", action="store_true", help="skip the KD-loss memory probes")
    ap.add_argument("--check", action="store_true", help="only check the profiles")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the results and plots of the runs finished so far")
    args = ap.parse_args()
    for name, prof in PROFILES.items():
        if prof["steps"] % prof["eval_every"] or prof["slm_steps"] % prof["eval_every"]:
            sys.exit(f"error: profile {name}: steps and slm_steps must be multiples of eval_every")
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
    jobs, w_chosen = Jobs(args.jobs), False

    ctxs = {"pydoc": {**prepare("pydoc", p, work), "threads": threads}}
    screen_ctx = ctxs["pydoc"]
    for arm in ARMS:  # the screen: seed 0, every arm, in order (the w arms before the kind arms)
        if arm.startswith("kind_") and not w_chosen:
            w_chosen = True
            jobs.drain()  # the kind arms run at the w arm that screened best
            w_runs = {a: runs_of(screen_ctx, a).get(0) for a in W_ARMS}
            done = {a: r for a, r in w_runs.items() if r is not None}
            if done:
                best = min(done, key=lambda a: ((done[a]["steps_fraction"] or math.inf), done[a]["final_val_loss"]))
                screen_ctx["best_w"] = W_ARMS[best]
        if not args.report_only:
            jobs.submit(partial(run_arm, screen_ctx, arm, 0, arm_settings(arm, screen_ctx)),
                        then=partial(check_regime, screen_ctx, 0, profile) if arm == "baseline" else None)
    jobs.drain()
    screen = {a: summarise_arm({0: r[0]}, {}, {}) for a in ARMS if 0 in (r := runs_of(screen_ctx, a))}
    screen_done = len(screen) == len(ARMS)
    plan_file = work / "plan.json"
    if not plan_file.is_file() and screen_done:  # fixed now, so later sessions confirm the same arms
        _save(plan_file, {**confirm_plan(screen, screen_ctx, p), "best_w": screen_ctx["best_w"]})
    plan = _json(plan_file) or {"singles": [], "combo": [], "best_w": screen_ctx["best_w"],
                                "ranking": confirm_plan(screen, screen_ctx, p)["ranking"] if "salt" in screen else []}
    screen_ctx["best_w"] = plan["best_w"]
    confirm = [*FIXED, *plan["singles"], *([f"combo-{'+'.join(plan['combo'])}"] if plan["combo"] else [])]

    if args.phase != "screen" and not args.report_only:
        ctxs["linuxdoc"] = {**prepare("linuxdoc", p, work), "best_w": plan["best_w"], "threads": threads}
        for seed in range(seeds):  # seed-major: a sweep cut short still has whole seeds on both corpora
            for ctx in ctxs.values():
                for arm in confirm:
                    jobs.submit(partial(run_arm, ctx, arm, seed, arm_settings(arm, ctx)),
                                then=partial(check_regime, ctx, seed, profile) if arm == "baseline" else None)
        jobs.drain()
    elif args.report_only and (work / "linuxdoc" / "scores" / "manifest.json").is_file():
        ctxs["linuxdoc"] = {**prepare("linuxdoc", p, work), "best_w": plan["best_w"]}

    corpora = {}
    for name, ctx in ctxs.items():
        base, salt_runs = runs_of(ctx, "baseline"), runs_of(ctx, "salt")
        arms = {a: summarise_arm(r, salt_runs, base) for a in (*ARMS, *confirm) if (r := runs_of(ctx, a))}
        for a, s in arms.items():
            s["settings"] = {k: v for k, v in arm_settings(a, ctx).items()}
        cross = [crossover(ctx, s) for s in base]
        reached = [c for c in cross if c is not None]
        corpora[name] = {"regime_ok": profile == "full" and bool(cross) and all(c is not None and c <= REGIME for c in cross),
                         "crossover_fraction": mean_se(reached)[0] if reached else None,
                         # the lead over the baseline an arm needs at GOAL of the run to meet the goal there
                         "val_lead_needed_for_goal": mean_se([_at(r["val_curve"], GOAL * p["steps"]) - r["final_val_loss"]
                                                              for r in base.values()])[0] if base else None,
                         "slm_final_val_loss": val_curve(ctx["slm_dir"])[-1][1],
                         "baseline_final_val_loss_mean": arms["baseline"]["final_val_loss_mean"] if "baseline" in arms else None,
                         "label_smoothing_eps": ctx["eps"], "cl_filter_cut": ctx["cl_cut"],
                         "cl_filter_excluded": ctx["cl_flagged"],
                         "data_manifest": read_manifest(ctx["data"]), "arms": arms}
    best_arm, goal = best_recipe(corpora, confirm, seeds)
    sizes = {"slm_params": _params(Path(screen_ctx["slm"])),
             "llm_params": _params(screen_ctx["work"] / "baseline" / "seed0" / "final")}
    result = {"profile": profile, "test_scale": profile == "quick", "phase": args.phase, "corpora": corpora,
              "best_arm": best_arm, "goal": goal, "plan": plan, "confirm_arms": confirm, "seeds": seeds,
              "ood_corpus": str(OOD_CORPUS), "steps": p["steps"], "token_budget": p["steps"] * p["batch"] * p["seq"],
              "slm_steps": p["slm_steps"], "n_kd_steps": round(N_KD * p["steps"]), "sizes": {**sizes, "slm": p["slm"],
                                                                                          "llm": p["llm"]},
              **(kd_costs(p, screen_ctx, args.skip_memory or profile == "quick")
                 if not args.report_only or (screen_ctx["work"] / "kd_overhead.json").is_file() else
                 dict.fromkeys(("kd_step_ratio_online", "kd_step_ratio_cached", "flop_limit",
                                "kd_loss_mem_ratio_chunked"))),
              "screen_complete": screen_done,
              "wall_s_training": round(sum(sum(_json(c["work"] / "wall_s.json").values()) for c in ctxs.values()), 1),
              "wall_s_this_invocation": round(time.time() - t_start, 1)}
    if profile == "quick":
        result["note"] = ("TEST SCALE: tiny models and a few dozen steps; the figures check that every arm, phase and "
                          "plot runs and say nothing about SALT")
    out = REPO / "bench" / "results"
    suffix = "" if profile == "full" else "_quick"
    plot_dir = out / f"salt{suffix}"
    plot_dir.mkdir(exist_ok=True)
    curves = {c: {a: [r["val_curve"] for r in runs_of(ctx, a).values()] for a in confirm} for c, ctx in ctxs.items()}
    plot(corpora, curves, p["steps"], result["n_kd_steps"], len(ARMS), plot_dir,
         f"SALT ({profile}): LLM {sizes['llm_params'] / 1e6:.2f}M, SLM {sizes['slm_params'] / 1e6:.2f}M")
    _save(out / f"salt{suffix}.json", result)
    print(summary(result))


def _params(model_dir: Path) -> int:
    return sum(t.numel() for t in load_model(model_dir, torch.device("cpu"))[0].parameters())


if __name__ == "__main__":
    main()
