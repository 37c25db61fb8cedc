"""Compression benchmark (issue 12): does progressive distillation (ERNIE-Tiny's GD -> GED -> TAD -> TSD) give a
small student more of its teacher's quality than the simpler recipes, at the same student budget?

Data: a general corpus (pydoc + linuxdoc) and a scarce task corpus (a slice of perldoc), validation split by
document, a cloze set from the task's held-out documents. A teacher LLM is pretrained on the general data and
fine-tuned on the task, both well past the student's budget; a student of about 1/4 of its FLOPs is made from it.
Every arm is one `slm_assist.compress` run with the same student steps, batch and sequence length:

  progressive         init prune -> gd (pretrained teacher, general, hidden) -> ged (fine-tuned, general, hidden)
                      -> tad (fine-tuned, task, hidden) -> tsd (fine-tuned, task, CE + KD + hidden)
  progressive_logit   the same stages with logit KD instead of the hidden-state loss
  tsd_only            init prune -> tsd for the whole budget
  single_stage        init prune -> one CE + KD stage on a general+task mix (half each) with the fine-tuned teacher:
                      the control that says whether the staging itself matters
  scratch             a random student of the same shape, CE on the task data
  init_*              the best distillation arm with another init: random, layers (copied teacher blocks), slm (a
                      student-shaped SLM pretrained on the general data: SALT's small model recycled)

    python bench/compress.py            # full profile -> bench/results/compress.json (+ compress_curves.png)
    python bench/compress.py --quick    # <= 10 min test scale; its figures say nothing about compression

Finished runs and their evaluations are reused on a rerun (`--seeds 5` adds seeds); --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from parallel import run_module  # bench/parallel.py, next to this script

from data_tools.corpus import CorpusConfig, joined_documents, read_documents, write_jsonl
from data_tools.pack import is_validation_doc
from slm_assist.core.dataset import read_manifest
from slm_assist.core.run_dir import read_metrics
from slm_assist.eval import cloze_accuracy, dataset_loss, inference_speed, load_model
from slm_assist.training.metrics import mean_se

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
TEACHER = dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=688)
STUDENT = dict(hidden_size=128, num_layers=3, num_heads=2, ffn_size=344)  # ~0.19 of the teacher's FLOPs/token

PROFILES = {
    "full": dict(vocab=4096, seq=256, batch=8, general_chars=12_000_000, task_chars=2_000_000, task_val=0.45,
                 teacher=TEACHER, student=STUDENT, teacher_steps=1000, finetune_steps=300, slm_steps=800,
                 budget=300, eval_every=75, eval_batches=8, cloze=1000, general_rows=256, calibration=128,
                 seeds=3, ablation_seeds=1),
    "quick": dict(vocab=1024, seq=128, batch=8, general_chars=600_000, task_chars=250_000, task_val=0.4,
                  teacher=dict(hidden_size=128, num_layers=4, num_heads=4, ffn_size=344),
                  student=dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=172), teacher_steps=120,
                  finetune_steps=40, slm_steps=60, budget=40, eval_every=10, eval_batches=4, cloze=100,
                  general_rows=32, calibration=16, seeds=1, ablation_seeds=1),
}
MAIN_ARMS = ("progressive", "progressive_logit", "tsd_only", "single_stage", "scratch")
INITS = {"init_random": "random", "init_layers": "layers", "init_slm": "model"}
LR = 2e-3


def run(*cmd: str) -> None:
    run_module(REPO, *cmd)


def _train_docs(jsonl: Path, data: Path) -> list[str]:
    """The documents pack put in the train split (the same order-independent hash split it used)."""
    m = read_manifest(data)
    docs = list(read_documents(CorpusConfig(paths=[str(jsonl)])))
    return [d for i, d in enumerate(docs) if not is_validation_doc(i, m["seed"], m["val_fraction"])]


def prepare_data(p: dict, work: Path) -> dict[str, Path]:
    """general, task and mixed (general train docs + task train docs, half each) packed with one tokenizer, and a
    cloze set from the task's held-out documents."""
    d = {k: work / k for k in ("general", "task", "mixed")}
    pack = [str(REPO / "configs/demo/data.yaml"), "overwrite=true", f"pack.seq_len={p['seq']}"]
    if not (d["general"] / "manifest.json").is_file():
        write_jsonl(work / "general.jsonl", joined_documents([CORPORA / "train_pydoc.txt.gz", CORPORA / "train_linuxdoc.txt.gz"],
                                                 p["general_chars"]))
        run("data_tools.pack", *pack, f"out_dir={d['general']}", f"corpus.paths=[{work / 'general.jsonl'}]",
            f"tokenizer.vocab_size={p['vocab']}", "pack.val_fraction=0.02")
    tok = f"tokenizer.path={d['general'] / 'tokenizer'}"
    if not (d["task"] / "manifest.json").is_file():
        write_jsonl(work / "task.jsonl", joined_documents([CORPORA / "train_perldoc.txt.gz"], p["task_chars"]))
        run("data_tools.pack", *pack, f"out_dir={d['task']}", f"corpus.paths=[{work / 'task.jsonl'}]", tok,
            f"pack.val_fraction={p['task_val']}")
    if not (d["mixed"] / "manifest.json").is_file():
        task = _train_docs(work / "task.jsonl", d["task"])
        general = _train_docs(work / "general.jsonl", d["general"])
        n = len(general)
        chars = sum(map(len, task))
        rng = np.random.default_rng(0)
        picked, total = [], 0
        for i in rng.permutation(n):
            if total >= chars:
                break
            picked.append(general[i])
            total += len(general[i])
        write_jsonl(work / "mixed.jsonl", [x for pair in zip(picked, task) for x in pair] + picked[len(task):]
                    + task[len(picked):])
        run("data_tools.pack", *pack, f"out_dir={d['mixed']}", f"corpus.paths=[{work / 'mixed.jsonl'}]", tok,
            "pack.val_fraction=0.02")
    cloze = work / "cloze.jsonl"
    if not cloze.is_file():
        run("data_tools.cloze", str(d["task"]), str(cloze), "--examples", str(p["cloze"]))
    n = sum(1 for _ in cloze.open())
    if n < p["cloze"]:
        sys.exit(f"error: {cloze}: {n} cloze items from the task's held-out documents, fewer than {p['cloze']}; "
                 "raise task_chars or task_val")
    return {**d, "cloze": cloze}


def _yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train_cfg(p: dict, **extra) -> dict:
    return {"micro_batch_size": p["batch"], "dtype": "bf16", "eval_every": p["eval_every"],
            "eval_batches": p["eval_batches"], "log_every": 10, "torch_threads": 2, **extra}


def train_models(p: dict, work: Path, d: dict[str, Path]) -> dict[str, Path]:
    """The teacher (pretrained on general, then fine-tuned on the task) and a student-shaped SLM (general)."""
    out = {}
    for name, shape, data, steps, start in (
            ("teacher", p["teacher"], d["general"], p["teacher_steps"], None),
            ("teacher_ft", None, d["task"], p["finetune_steps"], work / "teacher" / "final"),
            ("slm", p["student"], d["general"], p["slm_steps"], None)):
        run_dir = work / name
        if not (run_dir / "final" / "slm_assist.json").is_file():
            model = {"pretrained": str(start)} if start else {**shape, "max_position_embeddings": p["seq"]}
            cfg = {"run_dir": str(run_dir), "seed": 0, "data": {"path": str(data)}, "model": model,
                   "optim": {"lr": LR}, "schedule": {"kind": "cosine", "warmup_steps": max(10, steps // 20)},
                   "train": _train_cfg(p, max_steps=steps), "checkpoint": {"every": max(1, steps // 4), "keep_last": 1}}
            run("slm_assist.train", str(_yaml(work / f"{name}.yaml", cfg)))
        out[name] = run_dir / "final"
    return out


def stages(arm: str, p: dict) -> list[dict]:
    b = p["budget"]
    q = b // 4

    def st(name, teacher, data, steps, **loss):
        return {"name": name, "teacher": teacher, "data": data, "max_steps": steps, "loss": loss}

    if arm in ("progressive", "progressive_logit"):
        lat = {"kd": 1.0} if arm == "progressive_logit" else {"hidden": 1.0}
        return [st("gd", "pretrained", "general", q, **lat), st("ged", "finetuned", "general", q, **lat),
                st("tad", "finetuned", "task", q, **lat), st("tsd", "finetuned", "task", b - 3 * q, ce=1.0, kd=1.0,
                                                            **({} if "kd" in lat else lat))]
    if arm == "tsd_only":
        return [st("tsd", "finetuned", "task", b, ce=1.0, kd=1.0, hidden=1.0)]
    if arm == "single_stage":
        return [st("mixed", "finetuned", "general", b, ce=1.0, kd=1.0)]  # general_data = the mix
    if arm == "scratch":
        return [st("task", "none", "task", b, ce=1.0)]
    raise ValueError(arm)


def run_dir_of(arm: str, recipe: str, seed: int, work: Path) -> Path:
    """An ablation arm's runs are named after the recipe too: a rerun that picks another best recipe starts anew."""
    return work / "arms" / (f"{arm}_s{seed}" if arm == recipe else f"{arm}-{recipe}_s{seed}")


def compress_arm(arm: str, recipe: str, init: str, seed: int, p: dict, work: Path, d: dict, m: dict) -> Path:
    """Run (or reuse) one arm and seed; returns the student's final/."""
    run_dir = run_dir_of(arm, recipe, seed, work)
    plan = stages(recipe, p)
    final = run_dir / plan[-1]["name"] / "final"
    if (final / "slm_assist.json").is_file():
        return final
    init_cfg = {"kind": init, **({"calibration": p["calibration"]} if init == "prune" else {}),
                **({"path": str(m["slm"])} if init == "model" else {}), **({"every": 3} if init == "layers" else {})}
    model = ({**p["student"], "max_position_embeddings": p["seq"]} if init == "random"
             else dict(p["student"]) if init == "prune" else {})
    cfg = {"run_dir": str(run_dir), "seed": seed, "data_seed": seed, "teacher": str(m["teacher"]),
           "finetuned_teacher": str(m["teacher_ft"]),
           "general_data": str(d["mixed" if recipe == "single_stage" else "general"]), "task_data": str(d["task"]),
           "init": init_cfg, "model": model, "optim": {"lr": LR}, "schedule": {"kind": "cosine", "warmup_steps": 10},
           "train": _train_cfg(p), "checkpoint": {"every": 0}, "stages": plan}
    run("slm_assist.compress", str(_yaml(run_dir.with_suffix(".yaml"), cfg)))
    return final


@torch.inference_mode()
def evaluate(model_dir: Path, p: dict, d: dict, cache: dict) -> dict:
    key = str(model_dir)
    if key not in cache:
        model, tok = load_model(model_dir, torch.device("cpu"))
        cache[key] = {"task_val_loss": dataset_loss(model, tok, d["task"])["loss"],
                      "general_val_loss": dataset_loss(model, tok, d["general"], max_rows=p["general_rows"])["loss"],
                      "cloze_acc": cloze_accuracy(model, tok, d["cloze"])["accuracy"],
                      "params": sum(t.numel() for t in model.parameters())}
    return cache[key]


def _z(better: dict, worse: dict) -> float | None:
    """(worse - better) task loss / the difference's standard error; positive = `better` really is lower."""
    if better["task_val_loss_se"] is None or worse["task_val_loss_se"] is None:
        return None
    se = math.hypot(better["task_val_loss_se"], worse["task_val_loss_se"])
    return (worse["task_val_loss_mean"] - better["task_val_loss_mean"]) / se if se > 0 else None


def teacher_flops(recipe: str, p: dict, teacher_params: int) -> float:
    """Teacher forward FLOPs an arm spends (2 per parameter per token)."""
    tokens = sum(s["max_steps"] for s in stages(recipe, p) if s["teacher"] != "none") * p["batch"] * p["seq"]
    return 2.0 * teacher_params * tokens


def summarise(runs: dict[str, dict[int, dict]], teacher: dict, p: dict, recipes: dict[str, str]) -> dict:
    arms = {}
    scratch_mean = mean_se([r["task_val_loss"] for r in runs["scratch"].values()])[0]
    gap = scratch_mean - teacher["task_val_loss"]
    for arm, by_seed in runs.items():
        losses = [r["task_val_loss"] for r in by_seed.values()]
        mean, se = mean_se(losses)
        gaps = [(scratch_mean - x) / gap for x in losses] if gap > 0 else []
        arms[arm] = {"n_seeds": len(losses), "task_val_loss_mean": mean, "task_val_loss_se": se,
                     "gap_recovered_mean": mean_se(gaps)[0] if gaps else None,
                     "gap_recovered_se": mean_se(gaps)[1] if gaps else None,
                     "cloze_acc_mean": mean_se([r["cloze_acc"] for r in by_seed.values()])[0],
                     "cloze_acc_se": mean_se([r["cloze_acc"] for r in by_seed.values()])[1],
                     "general_val_loss_mean": mean_se([r["general_val_loss"] for r in by_seed.values()])[0],
                     "params": next(iter(by_seed.values()))["params"],
                     "teacher_flops": teacher_flops(recipes[arm], p, teacher["params"]),
                     "pilot": len(losses) < 3, "per_seed": by_seed}
    return arms


def plot(arms: dict, recipes: dict[str, str], work: Path, teacher: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(arms)
    means = [arms[a]["task_val_loss_mean"] for a in names]
    errs = [arms[a]["task_val_loss_se"] or 0.0 for a in names]
    ax_b.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.7)
    ax_b.axhline(teacher["task_val_loss"], color="tab:red", ls="--", label="fine-tuned teacher")
    ax_b.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax_b.set(title="task validation loss (mean ± s.e. over seeds)", ylim=(min(means + [teacher["task_val_loss"]]) - 0.3,
                                                                          max(means) + 0.3))
    ax_b.legend()
    for a in names:
        run = run_dir_of(a, recipes[a], min(arms[a]["per_seed"]), work)
        x0, pts = 0, []
        for st in yaml.safe_load(run.with_suffix(".yaml").read_text())["stages"]:
            pts += [(x0 + r["step"], r["val_loss"]) for r in read_metrics(run / st["name"]) if "val_loss" in r]
            x0 += st["max_steps"]
        if pts:
            ax_c.plot(*zip(*pts), marker="o", ms=2, lw=1, label=a)
    ax_c.set(title="validation CE on each stage's data (first seed)", xlabel="student step", ylabel="loss")
    ax_c.legend(fontsize=7)
    for ax in (ax_b, ax_c):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="<= 10 min test-scale profile")
    ap.add_argument("--seeds", type=int, default=0, help="seeds of the main arms (default: the profile's)")
    ap.add_argument("--ablation-seeds", type=int, default=0, help="seeds of the init ablation (default: profile's)")
    ap.add_argument("--fresh", action="store_true", help="delete this profile's earlier runs first")
    args = ap.parse_args()
    profile = "quick" if args.quick else "full"
    p = dict(PROFILES[profile])
    seeds = list(range(args.seeds or p["seeds"]))
    work = REPO / "runs" / "bench" / f"compress_{profile}"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cache_file = work / "evals.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def ev(model_dir: Path) -> dict:
        r = evaluate(model_dir, p, d, cache)
        cache_file.write_text(json.dumps(cache, indent=1))
        return r

    d = prepare_data(p, work)
    m = train_models(p, work, d)
    teacher, pretrained = ev(m["teacher_ft"]), ev(m["teacher"])
    runs: dict[str, dict[int, dict]] = {}
    recipes = {a: a for a in MAIN_ARMS}
    for seed in seeds:  # seed-major: an interrupted sweep has every arm at the same number of seeds
        for arm in MAIN_ARMS:
            init = "random" if arm == "scratch" else "prune"
            runs.setdefault(arm, {})[seed] = ev(compress_arm(arm, arm, init, seed, p, work, d, m))
    main_arms = summarise(runs, teacher, p, recipes)
    best = min((a for a in MAIN_ARMS if a != "scratch"), key=lambda a: main_arms[a]["task_val_loss_mean"])
    for arm, init in INITS.items():
        recipes[arm] = best
        for seed in range(args.ablation_seeds or p["ablation_seeds"]):
            runs.setdefault(arm, {})[seed] = ev(compress_arm(arm, best, init, seed, p, work, d, m))
    arms = summarise(runs, teacher, p, recipes)
    # the best recipe at the student's size: a `layers` init copies whole teacher blocks and is larger
    size = arms["progressive"]["params"]
    best_all = min((a for a in arms if a != "scratch" and abs(arms[a]["params"] - size) <= 0.01 * size),
                   key=lambda a: arms[a]["task_val_loss_mean"])

    student, _ = load_model(work / "arms" / "progressive_s0" / "tsd" / "final", torch.device("cpu"))
    big, tok = load_model(m["teacher_ft"], torch.device("cpu"))
    speed = {"student": inference_speed(student, tok, seq_len=p["seq"]), "teacher": inference_speed(big, tok,
                                                                                                   seq_len=p["seq"])}
    margin = arms["scratch"]["task_val_loss_mean"] - teacher["task_val_loss"]
    result = {
        "profile": profile, "seeds": seeds, "best_arm": best_all,
        "best_gap_recovered": arms[best_all]["gap_recovered_mean"],
        "progressive_vs_tsd_only_z": _z(arms["progressive"], arms["tsd_only"]),
        "progressive_vs_single_stage_z": _z(arms["progressive"], arms["single_stage"]),
        "student_speedup_batched": speed["student"]["batched_tokens_per_s"] / speed["teacher"]["batched_tokens_per_s"],
        "teacher_margin_over_scratch": margin,
        "teacher_margin_ok": bool(margin > 2 * (arms["scratch"]["task_val_loss_se"] or 0.0) and margin > 0),
        "best_recipe_for_init_ablation": best, "arms": arms,
        "teacher": {"finetuned": teacher, "pretrained": pretrained}, "speed": speed,
        "student_budget": {"steps": p["budget"], "tokens": p["budget"] * p["batch"] * p["seq"]},
        "teacher_budget": {"pretrain_steps": p["teacher_steps"], "finetune_steps": p["finetune_steps"]},
        "data": {k: read_manifest(d[k])["splits"] for k in ("general", "task", "mixed")},
        "sizes": {"teacher": p["teacher"], "student": p["student"]}, "profile_settings": {
            k: v for k, v in p.items() if k not in ("teacher", "student")},
        "wall_s_this_invocation": round(time.time() - t0, 1)}
    if profile == "quick":
        result["note"] = ("TEST SCALE: tiny models and a few dozen steps; the figures check that every arm runs and "
                          "say nothing about compression.")
    suffix = "" if profile == "full" else "_quick"
    out = REPO / "bench" / "results"
    plot(arms, recipes, work, teacher, out / f"compress{suffix}_curves.png",
         f"compression benchmark ({profile}): student {p['budget']} steps, seeds {len(seeds)}")
    (out / f"compress{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))


def summary(r: dict) -> str:
    def f(v, fmt=".4f"):
        return "—" if v is None else format(v, fmt)

    t = r["teacher"]
    lines = [f"compression benchmark, profile {r['profile']}, seeds {r['seeds']}: fine-tuned teacher task loss "
             f"{t['finetuned']['task_val_loss']:.4f} (pretrained {t['pretrained']['task_val_loss']:.4f}); margin "
             f"over the scratch student {r['teacher_margin_over_scratch']:.4f} (ok: {r['teacher_margin_ok']})", "",
             "| arm | seeds | task val loss | gap recovered | cloze acc | general val loss | params | teacher TFLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name}{' (pilot)' if a['pilot'] else ''} | {a['n_seeds']} | {f(a['task_val_loss_mean'])} ± "
                     f"{f(a['task_val_loss_se'])} | {f(a['gap_recovered_mean'], '.3f')} ± "
                     f"{f(a['gap_recovered_se'], '.3f')} | {f(a['cloze_acc_mean'], '.3f')} | "
                     f"{f(a['general_val_loss_mean'])} | {a['params'] / 1e6:.2f}M | {a['teacher_flops'] / 1e12:.2f} |")
    lines += ["", f"best arm {r['best_arm']} recovers {f(r['best_gap_recovered'], '.3f')} of the gap; progressive vs "
              f"TSD-only z = {f(r['progressive_vs_tsd_only_z'], '.2f')}, vs single-stage z = "
              f"{f(r['progressive_vs_single_stage_z'], '.2f')}; student batched speed "
              f"{r['student_speedup_batched']:.2f}x the teacher's"]
    if "note" in r:
        lines += ["", r["note"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
