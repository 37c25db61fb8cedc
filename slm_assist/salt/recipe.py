"""The SALT pretraining recipe: its run config, the objective and batch streams it hands to the Trainer, and how a
finished run's recipe reads in reports and model cards.

Without a `distill` teacher, cache or label smoothing the run is plain CE pretraining (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm_assist.core import dist
from slm_assist.core.errors import UserError
from slm_assist.core.run_dir import path_name
from slm_assist.core.scores import ScoresDir
from slm_assist.core.selection import read_index, read_summary
from slm_assist.kd.schedule import KDScheduleConfig
from slm_assist.kd.sources import CachedSoftLabels, OnlineTeacher, SmoothedOneHot, SoftTargetSource
from slm_assist.kd.teacher import load_teacher
from slm_assist.salt.objective import DistillConfig, SALTObjective
from slm_assist.training.models import compile_layers
from slm_assist.training.objective import CausalLMObjective, Objective
from slm_assist.training.trainer import RunData, Trainer, TrainerConfig


@dataclass
class RunConfig(TrainerConfig):
    """A pretraining run: the trainer's sections plus SALT's `distill` section."""

    distill: DistillConfig = field(default_factory=DistillConfig)


def build_trainer(cfg: RunConfig) -> Trainer:
    """The Trainer for a pretraining run, with every input checked before step 1: the KD-phase subset as the
    "kd" stream, the teacher's vocabulary, the cache's identity."""
    data = RunData(cfg)
    try:
        return _trainer(cfg, data)
    except BaseException:
        data.release()  # the run directory is given back when nothing trains in it
        raise


def _trainer(cfg: RunConfig, data: RunData) -> Trainer:
    d = cfg.distill
    rows = read_index(d.selection, len(data.train), "distill.selection") if d.selection else None
    streams = {"kd": data.stream(rows)} if rows is not None else {}
    objective = build_objective(cfg, data, rows)
    if not d.enabled:
        return Trainer(cfg, objective, streams, data)
    kd_stream = streams["kd"] if rows is not None else streams.setdefault("main", data.stream())
    if d.curriculum != "none":  # the stream the KD phase draws from comes easy to hard
        key = ScoresDir.open(d.curriculum_scores, "distill.curriculum_scores").train_column(d.curriculum, data.dataset)
        t = cfg.train
        kd_stream.order_first(key, d.schedule.n_kd(t.max_steps) * t.micro_batch_size * t.grad_accum * dist.world_size())
    if isinstance(objective, SALTObjective) and isinstance(objective.source, CachedSoftLabels) \
            and kd_stream.prefetches:
        # cached labels read and pinned with their batch, off the training thread, while the KD phase lasts
        source = objective.source
        kd_stream.attach = lambda b: source.attach(b) if objective.wants_soft_targets() else b
    return Trainer(cfg, objective, streams, data)


def build_objective(cfg: RunConfig, data: RunData, kd_rows: np.ndarray | None = None) -> Objective:
    """SALT's objective, or plain CE. `kd_rows`: the KD phase's subset of the train split (None = all of it)."""
    d = cfg.distill
    if not d.enabled:
        return CausalLMObjective()
    if d.fused_linear and cfg.train.zero_stage == 3:
        raise UserError("distill.fused_linear reads the output heads' weights outside a forward pass, which ZeRO-3 "
                        "keeps partitioned; use train.zero_stage <= 2 or distill.fused_linear=false")
    # bf16 halves a GPU teacher's weights and doubles its matmul rate; on CPU bf16 matmuls are slower, not faster
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and data.device.type == "cuda" else "auto"
    teacher = load_teacher(d.teacher, data.dataset, data.device, "distill.teacher", dtype) if d.teacher else None
    source: SoftTargetSource
    if d.label_smoothing:
        source = SmoothedOneHot(d.label_smoothing)
    elif d.cache:
        fields = ["distill.cache", *(f"distill.ensemble_caches[{i}]" for i in range(len(d.ensemble_caches)))]
        caches = []
        for path, name in zip([d.cache, *d.ensemble_caches], fields):
            cache = ScoresDir.open(path, name).soft_labels(data.dataset)
            missing = cache.missing(np.arange(len(data.train)) if kd_rows is None else kd_rows)
            if len(missing):  # found now, not at the step that first draws one
                raise UserError(f"{name}={path}: {len(missing)} of the KD phase's sequences are not cached "
                                f"(e.g. {missing[:5].tolist()}), "
                                + (f"distill.selection={d.selection} reaches outside the cached subset"
                                   if kd_rows is not None else "and the KD phase draws from the whole train split")
                                + "; score with cache.indices= the same selection, or without cache.indices")
            caches.append(cache)
        source = CachedSoftLabels(caches, d.gate_topk, "distill.gate_topk", d.gate_confidence, d.ensemble_combine)
    else:
        members = [teacher] + [load_teacher(p, data.dataset, data.device, f"distill.ensemble_teachers[{i}]", dtype)
                               for i, p in enumerate(d.ensemble_teachers)]
        if cfg.train.compiles(data.device):
            for m in members:
                compile_layers(m)
        source = OnlineTeacher(members, d.gate_topk, d.gate_confidence, d.ensemble_combine)
    probe = data.val_batches[0] if data.val_batches else None
    return SALTObjective(d, source, len(data.tokenizer), cfg.train.max_steps, teacher=teacher, probe_batch=probe)


@dataclass
class RecipeSummary:
    """How a run's recipe reads: a table cell (`short`), a model-card section (`title`, `lines`), hub tags."""

    short: str
    title: str = ""
    lines: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def describe(run_config: dict[str, Any], run_dir: str | Path | None = None) -> RecipeSummary:
    """The recipe of a finished run, from its saved config (`slm_assist.json` or config.yaml): the one rendering
    that reports and model cards share. Paths in exported metadata are relative to `run_dir`; they are read from
    there and shown by name."""
    d = run_config.get("distill") or {}
    if not (d.get("teacher") or d.get("cache") or d.get("label_smoothing")):
        return RecipeSummary("CE")
    s = d["schedule"]
    n_kd = KDScheduleConfig(**s).n_kd(run_config["train"]["max_steps"])
    span = f"{s['n_kd_fraction']:.0%} of steps" if s["n_kd_steps"] < 0 else f"{n_kd} steps"
    selection = Path(run_dir or ".") / d["selection"] if d.get("selection") else None
    summary = read_summary(selection) if selection else None
    policy = (summary or {}).get("policy")
    subset = ("" if not selection else ", SALT_DS subset" if policy == "salt_ds"
              else f", {policy} subset" if policy else ", selected subset")
    if d.get("label_smoothing"):
        short = f"control: label smoothing ε={d['label_smoothing']}, {s['kind']} w={s['weight']} for {span}{subset}"
    else:  # the cache, when given, is what the KD term uses (the teacher then only serves the handover)
        source = f"the cache {Path(d['cache']).name}" if d.get("cache") else Path(d["teacher"]).parent.name
        short = f"SALT: KD from {source}, {s['kind']} w={s['weight']} for {span}{subset}"
    lines = ["Loss `(1 - w_t)·CE + w_t·KD(student, SLM teacher; τ)`:", "",
             f"- teacher: `{path_name(d['teacher']) if d['teacher'] else '(cached soft labels)'}`"
             + (f", soft labels from the cache `{path_name(d['cache'])}`" if d.get("cache") else ""),
             f"- KD: {d['kind']}, τ = {d['tau']}",
             f"- schedule: {s['kind']}, w = {s['weight']}, n_KD = {n_kd} steps"]
    if selection:
        summary = summary or {}
        lines.append(f"- KD-phase data: the `{policy or '?'}` subset ({summary.get('kept', '?')} of "
                     f"{summary.get('total', '?')} sequences, `{path_name(d['selection'])}`)")
    members = d.get("ensemble_teachers") or d.get("ensemble_caches") or []
    if members:
        lines.append(f"- teacher ensemble: {1 + len(members)} SLMs combined by {d.get('ensemble_combine', 'mean')}")
    if d.get("curriculum", "none") != "none":
        lines.append(f"- KD-phase curriculum: easy to hard by the SLM's `{d['curriculum']}`")
    if d.get("gate_topk"):
        lines.append(f"- token gating: KD only where the target is in the teacher's top-{d['gate_topk']}")
    if d.get("gate_confidence"):
        lines.append(f"- confidence gating: no KD where the teacher is wrong at p >= {d['gate_confidence']}")
    if d.get("handover_every"):
        lines.append(f"- auto handover checked every {d['handover_every']} steps")
    if d.get("label_smoothing"):
        lines.append(f"- control: label smoothing ε = {d['label_smoothing']} instead of a teacher")
    tags = ["salt", "distillation"] if d.get("teacher") or d.get("cache") else []
    return RecipeSummary(short, "SALT recipe", lines, tags)
