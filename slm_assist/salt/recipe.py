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
from slm_assist.core.model_dir import ModelDir
from slm_assist.core.run_dir import RecipeSummary, path_name
from slm_assist.core.scores import ScoresDir
from slm_assist.core.selection import read_index, read_summary
from slm_assist.kd.schedule import KDScheduleConfig
from slm_assist.kd.sources import CachedSoftLabels, OnlineTeacher, SmoothedOneHot, SoftTargetSource
from slm_assist.kd.teacher import load_teacher
from slm_assist.salt.objective import DistillConfig, SALTObjective
from slm_assist.training.models import compile_layers
from slm_assist.training.objective import CausalLMObjective, Objective
from slm_assist.training.trainer import RunData, Trainer, TrainerConfig

RECIPE = "salt"
"""The recipe's name in its runs' exported metadata (a plain CE run is SALT without a KD term)."""


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
    rows = read_index(d.data.selection, len(data.train), "distill.data.selection") if d.data.selection else None
    streams = {"kd": data.stream(rows)} if rows is not None else {}
    objective = build_objective(cfg, data, rows)
    if d.data.curriculum != "none":  # the stream the KD phase draws from comes easy to hard
        kd_stream = streams["kd"] if rows is not None else streams.setdefault("main", data.stream())
        scores = ScoresDir.open(d.data.curriculum_scores, "distill.data.curriculum_scores")
        t = cfg.train
        kd_steps = d.schedule.n_kd(t.max_steps) + d.schedule.n_exit(t.max_steps)  # every step with w_t > 0
        kd_stream.order_first(scores.train_column(d.data.curriculum, data.dataset),
                              kd_steps * t.micro_batch_size * t.grad_accum * dist.world_size())
    return Trainer(cfg, objective, streams, data, recipe=RECIPE)


def build_objective(cfg: RunConfig, data: RunData, kd_rows: np.ndarray | None = None) -> Objective:
    """SALT's objective, or plain CE. `kd_rows`: the KD phase's subset of the train split (None = all of it)."""
    d = cfg.distill
    if not d.enabled:
        return CausalLMObjective(z_loss=cfg.train.z_loss)
    if d.loss.fused_linear and cfg.train.zero_stage == 3:
        raise UserError("distill.loss.fused_linear reads the output heads' weights outside a forward pass, which "
                        "ZeRO-3 keeps partitioned; use train.zero_stage <= 2 or distill.loss.fused_linear=false")
    field = "distill.handover.teacher" if d.handover.teacher else "distill.source.teachers[0]"
    teacher = load_teacher(d.teacher, data.dataset, data.device, field, cfg.train.dtype) if d.teacher else None
    source = build_source(cfg, data, teacher, kd_rows)
    probe = data.val_batches[0] if data.val_batches else None
    return SALTObjective(d, source, len(data.tokenizer), cfg.train.max_steps, teacher=teacher, probe_batch=probe,
                         z_loss=cfg.train.z_loss, student_shape=_student_shape(cfg) if d.align.weight else None)


def _student_shape(cfg: RunConfig) -> tuple[int, int]:
    """(hidden size, blocks) of the model this run trains, before it is built: what the alignment projects from."""
    if cfg.model.pretrained:
        c = ModelDir.open(cfg.model.pretrained, "model.pretrained").config()
        return c.hidden_size, c.num_hidden_layers
    return cfg.model.hidden_size, cfg.model.num_layers


def build_source(cfg: RunConfig, data: RunData, teacher: torch.nn.Module | None,
                 kd_rows: np.ndarray | None) -> SoftTargetSource:
    """The soft-target source `distill.source` names, with its gates: every input checked now (the cache's rows
    against the KD phase's), not at the step that first needs it. `teacher`: source.teachers' first, loaded."""
    d, src = cfg.distill, cfg.distill.source
    if src.kind == "label_smoothing":
        return SmoothedOneHot(src.epsilon)
    if src.kind == "cache":
        caches = []
        for i, path in enumerate(src.caches):
            name = f"distill.source.caches[{i}]"
            cache = ScoresDir.open(path, name).soft_labels(data.dataset)
            missing = cache.missing(np.arange(len(data.train)) if kd_rows is None else kd_rows)
            if len(missing):
                raise UserError(f"{name}={path}: {len(missing)} of the KD phase's sequences are not cached "
                                f"(e.g. {missing[:5].tolist()}), "
                                + (f"distill.data.selection={d.data.selection} reaches outside the cached subset"
                                   if kd_rows is not None else "and the KD phase draws from the whole train split")
                                + "; score with cache.indices= the same selection, or without cache.indices")
            caches.append(cache)
        return CachedSoftLabels(caches, d.gate.topk, "distill.gate.topk", d.gate.confidence, src.combine)
    members = [teacher] + [load_teacher(p, data.dataset, data.device, f"distill.source.teachers[{i}]",
                                        cfg.train.dtype) for i, p in enumerate(src.teachers[1:], start=1)]
    if cfg.train.compiles(data.device):
        for m in members:
            compile_layers(m)
    return OnlineTeacher(members, d.gate.topk, d.gate.confidence, src.combine)


def describe(meta: dict[str, Any], run_dir: str | Path) -> RecipeSummary:
    """The recipe of a finished run, from its exported metadata: the one rendering that reports and model cards
    share (found by the metadata's `recipe` through slm_assist.recipes). Paths in it are relative to `run_dir`;
    they are read from there and shown by name."""
    run_config = meta["run_config"]
    d = _sections(run_config.get("distill") or {})
    src, loss, s = d["source"], d["loss"], d["schedule"]
    if src.get("kind", "none") == "none":
        return RecipeSummary("CE")
    n_kd = KDScheduleConfig(**s).n_kd(run_config["train"]["max_steps"])
    span = f"{s['n_kd_fraction']:.0%} of steps" if s["n_kd_steps"] < 0 else f"{n_kd} steps"
    selection = Path(run_dir) / d["data"]["selection"] if d["data"].get("selection") else None
    summary = read_summary(selection) if selection else None
    policy = (summary or {}).get("policy")
    subset = ("" if not selection else ", SALT_DS subset" if policy == "salt_ds"
              else f", {policy} subset" if policy else ", selected subset")
    members = src.get("teachers") or src.get("caches") or []
    if src["kind"] == "label_smoothing":
        short = f"control: label smoothing ε={src['epsilon']}, {s['kind']} w={s['weight']} for {span}{subset}"
    else:
        origin = f"the cache {path_name(members[0])}" if src["kind"] == "cache" else Path(members[0]).parent.name
        short = f"SALT: KD from {origin}, {s['kind']} w={s['weight']} for {span}{subset}"
    what = {"teacher": "teacher", "cache": "soft labels from the cache", "label_smoothing": "control"}[src["kind"]]
    shown = ", ".join(f"`{path_name(m)}`" for m in members) or f"label smoothing ε = {src.get('epsilon')}"
    lines = ["Loss `(1 - w_t)·CE + w_t·KD(student, SLM teacher; τ)`:", "", f"- {what}: {shown}",
             f"- KD: {loss['kind']}, τ = {loss['tau']}", f"- schedule: {s['kind']}, w = {s['weight']}, n_KD = {n_kd} steps"
             + (f", then w decays to 0 over {KDScheduleConfig(**s).n_exit(run_config['train']['max_steps'])} steps "
                f"({s.get('exit_shape', 'linear')})" if s.get("exit_fraction") else "")]
    if selection:
        summary = summary or {}
        lines.append(f"- KD-phase data: the `{policy or '?'}` subset ({summary.get('kept', '?')} of "
                     f"{summary.get('total', '?')} sequences, `{path_name(d['data']['selection'])}`)")
    if len(members) > 1:
        lines.append(f"- teacher ensemble: {len(members)} SLMs combined by {src.get('combine', 'mean')}")
    if d["data"].get("curriculum", "none") != "none":
        lines.append(f"- KD-phase curriculum: easy to hard by the SLM's `{d['data']['curriculum']}`")
    if d["gate"].get("topk"):
        lines.append(f"- token gating: KD only where the target is in the teacher's top-{d['gate']['topk']}")
    if d["gate"].get("confidence"):
        lines.append(f"- confidence gating: no KD where the teacher is wrong at p >= {d['gate']['confidence']}")
    if d["handover"].get("every"):
        lines.append(f"- auto handover checked every {d['handover']['every']} steps")
    align = d.get("align") or {}
    if align.get("weight"):
        lines.append(f"- representation alignment (LET): student block {align['layer']} → the SLM's last hidden state "
                     f"({align['kind']}), weight {align['weight']} decaying to 0 over {align['fraction']:.0%} of steps")
    tags = ["salt", "distillation"] if src["kind"] in ("teacher", "cache") else []
    return RecipeSummary(short, "SALT recipe", lines, tags, selection=d["data"].get("selection") or "")


def _sections(d: dict[str, Any]) -> dict[str, Any]:
    """A distill section as exported, in its sections; one exported before it had sections (flat keys) is read
    into them."""
    if "source" in d or not d:
        return {"source": {}, "loss": {}, "gate": {}, "data": {}, "handover": {}, "schedule": {}, **d}
    kind = ("label_smoothing" if d.get("label_smoothing") else "cache" if d.get("cache")
            else "teacher" if d.get("teacher") else "none")
    return {"source": {"kind": kind, "teachers": [d["teacher"], *d.get("ensemble_teachers", [])] if kind == "teacher"
                       else [], "caches": [d["cache"], *d.get("ensemble_caches", [])] if kind == "cache" else [],
                       "combine": d.get("ensemble_combine", "mean"), "epsilon": d.get("label_smoothing", 0.0)},
            "loss": {"kind": d.get("kind"), "tau": d.get("tau")}, "schedule": d.get("schedule", {}),
            "gate": {"topk": d.get("gate_topk"), "confidence": d.get("gate_confidence")},
            "data": {"selection": d.get("selection"), "curriculum": d.get("curriculum", "none")},
            "handover": {"every": d.get("handover_every")}}
