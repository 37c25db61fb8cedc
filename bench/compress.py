"""Compression benchmark (issues 12, 25): how much of a fine-tuned teacher's task quality does a small student get
from ERNIE-Tiny's staged distillation and Minitron's pruning, per student step, per task and per FLOP?

Data: general text (the first 12M characters of pydoc + linuxdoc, alternating) and two scarce tasks packed with its
tokenizer, each with its own held-out split, cloze set and fine-tuned teacher: perl (perldoc) and linux (linuxdoc
documents past its first 8M characters: not in the general data). The teacher (d256 L6, 5.8M) is pretrained on
the general data; the main student (d128 L3, 1.1M, a fifth) is pruned from it unless said otherwise. B = 300
student steps of 8 x 256 tokens. Per arm and task: task loss and gap recovered ((L_scratch - L) / (L_scratch -
L_teacher)), mean ± s.e. over seeds (3; z paired by seed), cloze accuracy, general loss (forgetting).

Amortised view (ERNIE-Tiny's). A general student is made once per seed (pruned init -> GD: pretrained teacher,
general data, latent loss, as many steps as the SLM's pretraining costs) and serves both tasks; its cost is
reported, not charged. Every arm then spends B student steps on the task:
  scratch   random init, CE                   tsd_only     pruned -> TSD B (CE + KD)
  tad_tsd   pruned -> TAD B/2 -> TSD B/2      progressive  general student -> GED B/4 -> TAD B/4 -> TSD B/2
  gd_tsd    general student -> TSD B          slm          the student-shaped SLM (general CE) -> TSD B
Latent stages (GD, GED, TAD): logit KD + hidden states at 0.1 (the default before this sweep); the arms *_h0 / *_h1 use
0 / 1 in each. Perl only: single_stage (CE + KD on a general+task mix: does staging matter?), tsd_only_random /
_ft_source / _task_calib (random init; pruned from the fine-tuned teacher; importance on task data), prune_width /
_depth / _both (~0.3 of the teacher, pruned along one axis or both).
Minitron's view: scratch runs of 2x..16x B on perl; an arm's tokens_to_match is the scratch budget with its loss
(log-linear on the scratch curve's running minimum; 1.0: no better than 1x scratch; ">16": beyond every run).
Full charge: 6·N per student token, 2·N_teacher per distilled token, ~6·d_teacher·V per token of the logit-space
last-layer term, all of the general student it starts from, pruning's calibration, the teacher's task fine-tune
(if it uses the fine-tuned teacher) and the SLM's pretraining; the charged gap compares an arm with the scratch
student given the same FLOPs. Also: the task CE change across each latent stage (first stage_rows validation
rows), and the student's speed over the teacher's, timed side by side in alternating rounds.

    python bench/compress.py                # full profile -> bench/results/compress.json, compress_flops.png
    python bench/compress.py --quick        # <= ~15 min test scale; its figures say nothing about compression
    python bench/compress.py --plan         # the runs and their steps; trains nothing
    python bench/compress.py --report-only  # results of the runs finished so far

Finished runs (last stage's final/slm_assist.json) and evaluations (evals.json) are reused; --seeds N and
--ablation-seeds N add seeds, --fresh starts over. --jobs N (default 2) trains N runs side by side with
cpu_count / N threads each (bench/parallel.py), each logging to <run_dir>.log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import compress_report as report  # bench/, next to this script
import numpy as np
import torch
import yaml
from parallel import LOCK, Plan, beside, run_module, threads_per_job

from data_tools.corpus import CorpusConfig, joined_documents, read_documents, write_jsonl
from data_tools.pack import is_validation_doc
from slm_assist.core.dataset import read_manifest
from slm_assist.core.files import atomic_write_text
from slm_assist.eval import cloze_accuracy, dataset_loss, load_model

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
TEACHER = dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=688)  # 5.80M
STUDENTS = {"fifth": dict(hidden_size=128, num_layers=3, num_heads=2, ffn_size=344),  # 1.12M, the main student
            # ~0.3 of the teacher, one shape per pruning axis (init.axes)
            "width": dict(hidden_size=128, num_layers=6, num_heads=2, ffn_size=344),  # 1.71M
            "depth": dict(hidden_size=256, num_layers=1, num_heads=4, ffn_size=688),  # 1.84M
            "both": dict(hidden_size=192, num_layers=2, num_heads=3, ffn_size=516)}  # 1.68M
PROFILES = {
    "full": dict(vocab=4096, seq=256, batch=8, general_chars=12_000_000, task_chars=2_000_000,
                 linux_skip=8_000_000, task_val=0.45, teacher=TEACHER, students=STUDENTS, teacher_steps=1000,
                 finetune_steps=300, slm_steps=800, budget=300, warmup=10, eval_every=75, eval_batches=8, cloze=1000,
                 general_rows=256, stage_rows=256, calibration=128, seeds=3, ablation_seeds=3,
                 hidden_sweep=(0.0, 0.1, 1.0), multiple_seeds={2: 3, 4: 3, 8: 2, 16: 2}, speed_rounds=8),
    "quick": dict(vocab=1024, seq=128, batch=8, general_chars=600_000, task_chars=250_000, linux_skip=400_000,
                  task_val=0.4, teacher=dict(hidden_size=128, num_layers=4, num_heads=4, ffn_size=344),
                  students={k: dict(zip(("hidden_size", "num_layers", "num_heads", "ffn_size"), v)) for k, v in {
                      "fifth": (64, 2, 2, 172), "width": (64, 4, 2, 172), "depth": (128, 1, 4, 344),
                      "both": (96, 2, 3, 258)}.items()},
                  teacher_steps=120, finetune_steps=40, slm_steps=60, budget=32, warmup=4, eval_every=8,
                  eval_batches=4, cloze=100, general_rows=32, stage_rows=32, calibration=16, seeds=1,
                  ablation_seeds=1, hidden_sweep=(0.0, 0.1), multiple_seeds={2: 1, 4: 1, 8: 1, 16: 1},
                  speed_rounds=4, test_scale=True),
}
TASKS = ("perl", "linux")
MULTIPLES = (1, 2, 4, 8, 16)
# the hidden weight of the main arms, stages.latent_loss()'s until this bench's sweep chose 1.0 for it; kept, so
# the finished runs stay what their names say (the sweep arms *_h0 / *_h1 hold the other weights)
DEFAULT_HIDDEN = 0.1
TSD = {"ce": 1.0, "kd": 1.0}
LR = 2e-3


# ---- arms and their stage plans (pure) ---------------------------------------------------------------------------

class Arm(NamedTuple):  # not a dataclass: tests load this script without registering it as a module
    recipe: str  # scratch, tsd, tad_tsd, progressive, single_stage
    init: str = "prune"  # random, prune, general (the general student), slm
    group: str = "prune"  # amortised, control, sweep, prune, curve: its view, and so its tasks and seeds
    hidden: float = DEFAULT_HIDDEN  # the latent stages' hidden-state weight (the general student's GD too)
    student: str = "fifth"
    source: str = "pretrained"  # prune: init.source
    calibration_data: str = "general"
    axes: str = "both"
    multiple: int = 1  # curve: the scratch budget in B
    base: str = ""  # sweep: the default-weight arm it varies

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.group == "amortised" else ("perl",)


def make_arms(p: dict) -> dict[str, Arm]:
    arms = {"scratch": Arm("scratch", "random", "amortised"), "tsd_only": Arm("tsd", group="amortised"),
            "tad_tsd": Arm("tad_tsd", group="amortised"), "progressive": Arm("progressive", "general", "amortised"),
            "gd_tsd": Arm("tsd", "general", "amortised"), "slm": Arm("tsd", "slm", "amortised"),
            "single_stage": Arm("single_stage", group="control")}
    for h in p["hidden_sweep"]:
        for base in ("tad_tsd", "progressive", "gd_tsd") if h != DEFAULT_HIDDEN else ():
            arms[f"{base}_h{h:g}"] = arms[base]._replace(group="sweep", hidden=h, base=base)
    arms.update(tsd_only_random=Arm("tsd", "random"), tsd_only_ft_source=Arm("tsd", source="finetuned"),
                tsd_only_task_calib=Arm("tsd", calibration_data="task"))
    for axes in ("width", "depth", "both"):
        arms[f"prune_{axes}"] = Arm("tsd", student=axes, axes=axes)
    for k in MULTIPLES[1:]:
        arms[f"scratch_x{k}"] = Arm("scratch", "random", "curve", multiple=k)
    return arms


def arm_seeds(arm: Arm, p: dict, seeds: int, ablation_seeds: int) -> range:
    if arm.group == "curve":
        return range(p["multiple_seeds"][arm.multiple])
    return range(seeds if arm.group in ("amortised", "control") else ablation_seeds)


def latent(h: float) -> dict:
    """A latent stage's loss: logit KD, plus hidden states (the last block through the teacher's head) at h."""
    return {"kd": 1.0} if h == 0 else {"kd": 1.0, "hidden": h, "last_layer": "logits"}


def _st(name: str, teacher: str, data: str, steps: int, loss: dict) -> dict:
    return {"name": name, "teacher": teacher, "data": data, "max_steps": steps, "loss": dict(loss)}


def stages(arm: Arm, p: dict) -> list[dict]:
    b, lat = p["budget"] * arm.multiple, latent(arm.hidden)
    if arm.recipe == "scratch":
        return [_st("task", "none", "task", b, {"ce": 1.0})]
    if arm.recipe == "tsd":
        return [_st("tsd", "finetuned", "task", b, TSD)]
    if arm.recipe == "tad_tsd":
        return [_st("tad", "finetuned", "task", b // 2, lat), _st("tsd", "finetuned", "task", b - b // 2, TSD)]
    if arm.recipe == "progressive":
        q = b // 4
        return [_st("ged", "finetuned", "general", q, lat), _st("tad", "finetuned", "task", q, lat),
                _st("tsd", "finetuned", "task", b - 2 * q, TSD)]
    if arm.recipe == "single_stage":  # general_data is the general+task mix
        return [_st("mixed", "finetuned", "general", b, TSD)]
    raise ValueError(arm.recipe)


def general_plan(h: float, p: dict) -> list[dict]:
    """The general student's one stage: GD as long as the SLM's pretraining costs."""
    c = report.costs(p)
    return [_st("gd", "pretrained", "general", report.gd_steps(latent(h), c.n_slm, c), latent(h))]


def general_flops(h: float, p: dict) -> float:
    c = report.costs(p)
    return report.run_flops(general_plan(h, p), c.n_slm, c, "prune")["total"]


def arm_flops(arm: Arm, p: dict) -> dict[str, float]:
    n = report.llama_params(p["students"][arm.student], p["vocab"])
    return report.run_flops(stages(arm, p), n, report.costs(p), arm.init, arm.source,
                            general_flops(arm.hidden, p) if arm.init == "general" else 0.0)


def run_config(what: tuple, p: dict, work: Path) -> dict:
    """The compress config of ("arm", name, task, seed) or of the general student ("general", hidden, seed)."""
    if what[0] == "general":
        (_, h, seed), task = what, None
        arm, plan = Arm("gd", hidden=h), general_plan(h, p)
    else:
        _, name, task, seed = what
        arm = make_arms(p)[name]
        plan = stages(arm, p)
    shape = p["students"][arm.student]
    if arm.init == "random":
        init, model = {"kind": "random"}, {**shape, "max_position_embeddings": p["seq"]}
    elif arm.init == "prune":
        init, model = {"kind": "prune", "calibration": p["calibration"], "source": arm.source,
                       "calibration_data": arm.calibration_data, "axes": arm.axes}, dict(shape)
    else:
        start = general_dir(work, arm.hidden, seed) / "gd" if arm.init == "general" else work / f"models/slm_s{seed}"
        init, model = {"kind": "model", "path": str(start / "final")}, {}
    finetuned = arm.source == "finetuned" or any(s["teacher"] == "finetuned" for s in plan)
    steps = sum(s["max_steps"] for s in plan)
    return {"seed": seed, "data_seed": seed, "teacher": str(work / "models/teacher/final"),
            **({"finetuned_teacher": str(work / f"models/ft_{task}/final")} if finetuned else {}),
            "general_data": str(work / "data" / ("mixed" if arm.recipe == "single_stage" else "general")),
            **({"task_data": str(work / "data" / task)} if task else {}), "init": init, "model": model,
            "optim": {"lr": LR}, "schedule": {"kind": "cosine", "warmup_steps": p["warmup"]},
            # the long scratch runs resume from a checkpoint; the others are short enough to rerun
            "checkpoint": {"every": p["budget"], "keep_last": 1} if steps > 2 * p["budget"] else {"every": 0},
            "stages": plan}


def general_dir(work: Path, h: float, seed: int) -> Path:
    return work / "general" / f"h{h:g}_s{seed}"


def run_plan(p: dict, seeds: int, ablation_seeds: int) -> list[tuple[str, tuple, tuple[str, ...]]]:
    """Every run as (name = its directory under the work dir, what, the runs it needs), in the order they start:
    the teacher (every compress run reads it), its fine-tunes, the runs that need nothing else (longest first, so
    they do not make a tail), then the rest, the main views first."""
    arms, out, names = make_arms(p), [], set()

    def add(name: str, what: tuple, deps: list[str]) -> None:
        if name not in names:
            names.add(name)
            out.append((name, what, tuple(deps)))

    add("models/teacher", ("train", "teacher"), [])
    for t in TASKS:
        add(f"models/ft_{t}", ("train", f"ft_{t}"), ["models/teacher"])
    for group in ("amortised", "control", "curve", "sweep", "prune"):
        for seed in range(max(seeds, ablation_seeds, *p["multiple_seeds"].values())):
            for name, arm in arms.items():
                if arm.group != group or seed not in arm_seeds(arm, p, seeds, ablation_seeds):
                    continue
                deps = ["models/teacher"]
                if arm.init == "slm":
                    deps.append(f"models/slm_s{seed}")
                    add(deps[-1], ("train", f"slm_s{seed}"), [])
                if arm.init == "general":
                    deps.append(f"general/h{arm.hidden:g}_s{seed}")
                    add(deps[-1], ("general", arm.hidden, seed), ["models/teacher"])
                for task in arm.tasks:
                    add(f"arms/{task}/{name}_s{seed}", ("arm", name, task, seed),
                        deps + ([f"models/ft_{task}"] if arm.recipe != "scratch" else []))
    free = sorted((r for r in out[3:] if set(r[2]) <= {"models/teacher"}), key=lambda r: -run_steps(r[1], p))
    return [*out[:3], *free, *(r for r in out[3:] if not set(r[2]) <= {"models/teacher"})]


def run_steps(what: tuple, p: dict) -> int:
    """Student (or model) optimizer steps of one run."""
    if what[0] == "train":
        return {"teacher": p["teacher_steps"], "ft": p["finetune_steps"]}.get(what[1].split("_")[0], p["slm_steps"])
    plan = general_plan(what[1], p) if what[0] == "general" else stages(make_arms(p)[what[1]], p)
    return sum(s["max_steps"] for s in plan)


# ---- data ------------------------------------------------------------------------------------------------------

def docs_after(docs: list[str], skip_chars: int, chars: int) -> list[str]:
    """The documents that start at or past `skip_chars` cumulative characters, until they hold `chars`."""
    out, seen, taken = [], 0, 0
    for d in docs:
        if seen >= skip_chars and taken < chars:
            out.append(d)
            taken += len(d)
        seen += len(d)
    return out


def task_docs(task: str, p: dict) -> list[str]:
    if task == "perl":
        return joined_documents([CORPORA / "train_perldoc.txt.gz"], p["task_chars"])
    # the general data holds about the first general_chars / 2 of linuxdoc; the task starts well past it
    return docs_after(joined_documents([CORPORA / "train_linuxdoc.txt.gz"], p["linux_skip"] + p["task_chars"]),
                      p["linux_skip"], p["task_chars"])


def _train_docs(jsonl: Path, data: Path) -> list[str]:
    """The documents pack put in the train split (the same order-independent hash split it used)."""
    m = read_manifest(data)
    docs = list(read_documents(CorpusConfig(paths=[str(jsonl)])))
    return [d for i, d in enumerate(docs) if not is_validation_doc(i, m["seed"], m["val_fraction"])]


def prepare_data(p: dict, root: Path) -> None:
    """general (its own tokenizer), perl and linux (each with a held-out split and a cloze set from it) and mixed
    (perl's and general train documents, half each), all packed with the general tokenizer."""
    def pack(name: str, docs: Callable[[], list[str]], *sets: str) -> None:
        if not (root / name / "manifest.json").is_file():
            write_jsonl(root / f"{name}.jsonl", docs())
            run_module(REPO, "data_tools.pack", str(REPO / "configs/demo/data.yaml"), "overwrite=true",
                       f"pack.seq_len={p['seq']}", f"out_dir={root / name}", f"corpus.paths=[{root / name}.jsonl]", *sets)

    pack("general", lambda: joined_documents([CORPORA / "train_pydoc.txt.gz", CORPORA / "train_linuxdoc.txt.gz"],
                                             p["general_chars"]), f"tokenizer.vocab_size={p['vocab']}",
         "pack.val_fraction=0.02")
    tok = f"tokenizer.path={root / 'general' / 'tokenizer'}"
    for task in TASKS:
        pack(task, partial(task_docs, task, p), tok, f"pack.val_fraction={p['task_val']}")
        cloze = root / f"cloze_{task}.jsonl"
        if not cloze.is_file():
            run_module(REPO, "data_tools.cloze", str(root / task), str(cloze), "--examples", str(p["cloze"]))
        if (n := sum(1 for _ in cloze.open())) < p["cloze"]:
            sys.exit(f"error: {cloze}: {n} cloze items from the held-out documents, fewer than {p['cloze']}")

    def mixed() -> list[str]:
        task, general = _train_docs(root / "perl.jsonl", root / "perl"), _train_docs(root / "general.jsonl", root / "general")
        picked, total, chars = [], 0, sum(map(len, task))
        for i in np.random.default_rng(0).permutation(len(general)):
            if total >= chars:
                break
            picked.append(general[i])
            total += len(general[i])
        return [x for pair in zip(picked, task) for x in pair] + picked[len(task):] + task[len(picked):]

    pack("mixed", mixed, tok, "pack.val_fraction=0.02")


# ---- running and evaluating --------------------------------------------------------------------------------------

def _finished(final: Path) -> bool:
    return (final / "slm_assist.json").is_file()


def final_of(run_dir: Path, plan: list[dict]) -> Path:
    return run_dir / plan[-1]["name"] / "final"


def points_of(run_dir: Path, plan: list[dict]) -> dict[str, Path]:
    """The student before and after each latent stage (no CE term), whose task CE change the bench reports."""
    last = max((i for i, s in enumerate(plan) if not s["loss"].get("ce")), default=-1)
    return {"init": run_dir / "init", **{s["name"]: run_dir / s["name"] / "final" for s in plan[: last + 1]}} if last >= 0 else {}


class Bench:
    def __init__(self, p: dict, work: Path, jobs: int) -> None:
        self.p, self.work, self.arms = p, work, make_arms(p)
        self.threads, self.log = threads_per_job(jobs), jobs > 1

    def launch(self, module: str, run_dir: Path, cfg: dict) -> None:
        p = self.p
        cfg = {"run_dir": str(run_dir), **cfg, "train": {
            "micro_batch_size": p["batch"], "dtype": "bf16", "eval_every": p["eval_every"], "log_every": 10,
            "eval_batches": p["eval_batches"], "torch_threads": self.threads, **cfg.get("train", {})}}
        path, log = beside(run_dir, ".yaml"), beside(run_dir, ".log")  # one pair per run, dots and all
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_module(REPO, module, str(path), log=log if self.log else None)

    def where(self, what: tuple) -> tuple[Path, list[dict], tuple[str, ...]]:
        """A compress run's directory, its stages, and the tasks it is evaluated on."""
        if what[0] == "general":
            return general_dir(self.work, what[1], what[2]), general_plan(what[1], self.p), TASKS
        _, name, task, seed = what
        return self.work / "arms" / task / f"{name}_s{seed}", stages(self.arms[name], self.p), (task,)

    def run(self, what: tuple, train: bool = True) -> dict:
        """Train one run of the plan unless it finished (or not `train`); evaluate what it made: the final student
        and the task loss around its latent stages ({"final": ..., "points": {task: {point: loss}}})."""
        p, w = self.p, self.work
        if what[0] == "train":
            name, ft = what[1], what[1].startswith("ft_")
            run_dir, steps, seed = w / "models" / name, run_steps(what, p), int(name[5:]) if name.startswith("slm_s") else 0
            if train and not _finished(run_dir / "final"):
                shape = p["teacher"] if name == "teacher" else p["students"]["fifth"]
                self.launch("slm_assist.train", run_dir, {
                    "seed": seed, "data": {"path": str(w / "data" / (name[3:] if ft else "general")), "seed": seed},
                    "model": {"pretrained": str(w / "models/teacher/final")} if ft else {
                        **shape, "max_position_embeddings": p["seq"]},
                    "optim": {"lr": LR}, "schedule": {"kind": "cosine", "warmup_steps": max(10, steps // 20)},
                    "train": {"max_steps": steps, **({"torch_threads": threads_per_job(1)} if name == "teacher" else {})},
                    "checkpoint": {"every": max(1, steps // 4), "keep_last": 1}})
            for task in TASKS if name == "teacher" else (name[3:],) if ft else ():
                self.evaluate(run_dir / "final", task)
            return {}
        run_dir, plan, tasks = self.where(what)
        final = final_of(run_dir, plan)
        if train and not _finished(final):
            self.launch("slm_assist.compress", run_dir, run_config(what, p, w))
        points = points_of(run_dir, plan)
        return {"final": self.evaluate(final, tasks[0]) if what[0] == "arm" and _finished(final) else None,
                "points": {t: {k: ev["task_val_loss"] for k, d in points.items() if (ev := self.evaluate(d, t, False))}
                           for t in tasks}}

    @torch.inference_mode()
    def evaluate(self, model_dir: Path, task: str, full: bool = True) -> dict | None:
        """Task loss, general loss (forgetting), cloze accuracy and size; `full=False`: the task loss on the first
        stage_rows validation rows only (the points around latent stages). Cached in evals.json."""
        if not (model_dir / "config.json").is_file():
            return None
        key, cache_file = f"{model_dir.relative_to(self.work)}|{task}|{'final' if full else 'task'}", self.work / "evals.json"
        with LOCK:  # one evaluation at a time, beside the runs still training
            cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
            if key not in cache:
                model, tok = load_model(model_dir, torch.device("cpu"))
                data, p = self.work / "data", self.p
                cache[key] = {"task_val_loss": dataset_loss(model, tok, data / task)["loss"],
                              "general_val_loss": dataset_loss(model, tok, data / "general", max_rows=p["general_rows"])["loss"],
                              "cloze_acc": cloze_accuracy(model, tok, data / f"cloze_{task}.jsonl")["accuracy"],
                              "params": sum(t.numel() for t in model.parameters())} if full else {
                    "task_val_loss": dataset_loss(model, tok, data / task, max_rows=p["stage_rows"])["loss"]}
                atomic_write_text(cache_file, json.dumps(cache, indent=1))
            return cache[key]

    def collect(self, plan: list) -> tuple[dict, dict, dict]:
        """Every finished run's evaluation (runs[task][arm][seed]), the teachers' (teachers[task]), and each latent
        stage's task CE change (latent[run][task][stage]); evaluates what finished and was not evaluated yet."""
        runs: dict[str, dict[str, dict[int, dict]]] = {t: {} for t in TASKS}
        points: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
        for _, what, _ in plan:
            got = self.run(what, train=False)
            if what[0] == "train":
                continue
            label = what[1] if what[0] == "arm" else f"general_h{what[1]:g}"
            if got["final"]:
                runs[what[2]].setdefault(label, {})[what[-1]] = got["final"]
            for t, pts in got["points"].items():
                if pts:
                    points.setdefault(label, {}).setdefault(t, {})[what[-1]] = pts
        teachers = {t: {"finetuned": self.evaluate(self.work / f"models/ft_{t}/final", t),
                        "pretrained": self.evaluate(self.work / "models/teacher/final", t)} for t in TASKS}
        return runs, teachers, {label: {t: report.latent_changes(by_seed) for t, by_seed in by_task.items()}
                                for label, by_task in points.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="<= ~15 min test-scale profile")
    ap.add_argument("--seeds", type=int, default=0, help="seeds of the amortised arms (default: the profile's)")
    ap.add_argument("--ablation-seeds", type=int, default=0, help="seeds of the sweep and pruning arms")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, cpu_count / jobs threads each")
    ap.add_argument("--fresh", action="store_true", help="delete this profile's earlier runs first")
    ap.add_argument("--plan", action="store_true", help="print the runs and their steps, train nothing")
    ap.add_argument("--report-only", action="store_true", help="train nothing: results of the finished runs")
    args = ap.parse_args()
    if args.jobs < 1:
        sys.exit(f"error: --jobs: expected >= 1, got {args.jobs}")
    profile = "quick" if args.quick else "full"
    p = PROFILES[profile]
    seeds, ablation = args.seeds or p["seeds"], args.ablation_seeds or p["ablation_seeds"]
    plan = run_plan(p, seeds, ablation)
    if args.plan:
        for name, what, deps in plan:
            print(f"{name}: {run_steps(what, p)} steps" + (f" after {', '.join(deps)}" if deps else ""))
        print(f"{len(plan)} runs, {sum(run_steps(w, p) for _, w, _ in plan)} steps")
        return
    work = REPO / "runs" / "bench" / f"compress25_{profile}"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True, exist_ok=True)
    t0, bench = time.time(), Bench(p, work, args.jobs)
    torch.set_num_threads(bench.threads)
    prepare_data(p, work / "data")
    if not args.report_only:
        bench.run(plan[0][1])  # the teacher, alone with every core: every other run but the SLMs needs it
        runner = Plan(args.jobs)
        for name, what, deps in plan:
            runner.add(name, partial(bench.run, what), deps)
        runner.jobs.drain()
    runs, teachers, latent = bench.collect(plan)
    if not all(e for t in teachers.values() for e in t.values()) or not runs["perl"].get("scratch"):
        sys.exit("error: no teacher or no scratch run has finished yet: nothing to report")
    meta = {a: {"group": arm.group, "same_size": arm.student == "fifth", "base": arm.base,
                "flops": arm_flops(arm, p)} for a, arm in bench.arms.items()}
    n = {r["params"] for t in runs.values() for a, by in t.items() for r in by.values() if bench.arms[a].student == "fifth"}
    if n != {report.costs(p).n_slm}:  # the FLOPs count parameters from the shapes, before anything trains
        print(f"warning: the main student has {n} parameters, the FLOPs count {report.costs(p).n_slm}")
    general = {"flops": {f"{h:g}": general_flops(h, p) for h in p["hidden_sweep"]},
               "steps": {f"{h:g}": general_plan(h, p)[0]["max_steps"] for h in p["hidden_sweep"]},
               "slm_pretrain_flops": report.slm_flops(report.costs(p)), "default": f"{DEFAULT_HIDDEN:g}"}
    sp, student = None, work / "arms/perl/tsd_only_s0/tsd/final"
    if _finished(student):  # teacher and student side by side, with every core: nothing else runs now
        torch.set_num_threads(threads_per_job(1))
        (teacher, tok), (small, _) = (load_model(d, torch.device("cpu")) for d in (work / "models/ft_perl/final", student))
        ids = torch.randint(0, len(tok), (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(0))
        sp = report.speed_rounds(teacher, small, ids, p["speed_rounds"])
    result = {"profile": profile, "seeds": list(range(seeds)), "ablation_seeds": list(range(ablation)),
              **report.build(runs, teachers, meta, list(MULTIPLES), latent, general, sp, p),
              "data": {k: read_manifest(work / "data" / k)["splits"] for k in ("general", *TASKS, "mixed")},
              "wall_s_this_invocation": round(time.time() - t0, 1)}
    out, suffix = REPO / "bench" / "results", "" if profile == "full" else "_quick"
    report.plot(result, out / f"compress{suffix}_flops.png",
                f"compression benchmark ({profile}): B = {p['budget']} student steps, seeds {seeds}")
    atomic_write_text(out / f"compress{suffix}.json", json.dumps(result, indent=1, default=str) + "\n")
    print(report.summary(result))


if __name__ == "__main__":
    main()
