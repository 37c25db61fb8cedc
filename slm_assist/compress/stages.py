"""Progressive distillation (ERNIE-Tiny): a list of stages, each an ordinary Trainer run under
`run_dir/<stage>/`, changing one of teacher, data and loss at a time. The student carries over from stage to stage;
a `trains: teacher` stage fine-tunes the pretrained LLM on the task data to make the "fine-tuned teacher" of the
later stages. A relaunch skips finished stages (their final/ exists) and resumes the unfinished one exactly.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from slm_assist.compress.init import ORIGIN, InitConfig, chosen_layers, make_student, prune_targets
from slm_assist.compress.latent import layer_map
from slm_assist.compress.objective import CompressObjective, LossConfig
from slm_assist.compress.prune import check_prune_targets
from slm_assist.core import dist
from slm_assist.core.config import PathSetting, check, check_no_effect, path_settings, record_diff, to_dict
from slm_assist.core.dataset import PackedDataset, shared_span_share
from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.files import atomic_output_dir, check_writable
from slm_assist.core.model_dir import META, MODEL_FILES, ModelDir, append_stage
from slm_assist.core.relaunch import input_fingerprints
from slm_assist.core.run_dir import FINAL, RunDir, path_name
from slm_assist.kd.teacher import load_teacher
from slm_assist.training.batches import DataConfig
from slm_assist.training.checkpoint import RELAUNCH_RULES, launch_config
from slm_assist.training.models import ModelConfig
from slm_assist.training.trainer import RunData, TrainConfig, Trainer, TrainerConfig, TrainingSections

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class StageConfig:
    name: str = "stage"
    """The stage's name and its run directory under run_dir."""
    trains: Literal["student", "teacher"] = "student"
    """teacher: fine-tune the pretrained LLM (the start of later `teacher: finetuned` stages) instead."""
    teacher: Literal["none", "pretrained", "finetuned"] = "pretrained"
    """Whom the stage distils from: the pretrained LLM, its fine-tuned copy, or nobody (plain CE)."""
    data: Literal["general", "task"] = "general"
    """Which packed dataset the stage trains on (general_data or task_data)."""
    loss: LossConfig = field(default_factory=lambda: latent_loss())
    """The stage's loss terms; default: the latent stage's (`latent_loss`)."""
    max_steps: int = 100
    """Optimizer steps of this stage (its LR schedule spans them)."""
    lr: float = 0.0
    """Peak LR of this stage (0 = optim.lr)."""
    micro_batch_size: int = 0
    """Sequences per micro-batch and rank in this stage (0 = train.micro_batch_size)."""
    grad_accum: int = 0
    """Micro-batches per optimizer step in this stage (0 = train.grad_accum)."""
    patience: int = 0
    """End the stage early once its validation loss has not improved for this many evaluations, so the budget
    moves to the next stage (0 = off, the whole max_steps)."""

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name and not self.name.startswith(".") and self.name != "init",
              "name", self.name, "a directory name other than init (run_dir/init holds the initial student)")
        check(self.max_steps > 0, "max_steps", self.max_steps, "> 0")
        check(self.lr >= 0, "lr", self.lr, ">= 0 (0 = optim.lr)")
        check(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, ">= 0 (0 = train's)")
        check(self.grad_accum >= 0, "grad_accum", self.grad_accum, ">= 0 (0 = train's)")
        check(self.patience >= 0, "patience", self.patience, ">= 0 (0 = off)")
        if self.teacher == "none":
            check(not self.loss.needs_teacher, "teacher", self.teacher,
                  "a teacher for kd/hidden/attention losses (pretrained or finetuned)")
        if self.trains == "teacher":
            check(self.teacher == "none", "teacher", self.teacher, "none when the stage fine-tunes the teacher")


def latent_loss() -> LossConfig:
    """ERNIE-Tiny's latent stages made for a causal LM, whose output head is its task head: the logit KD term in
    every stage, hidden states matched on the intermediate layers, the last block in logit space through the
    teacher's head, and projections that start from a pruned student's kept channels (bench/RESULTS.md, issue 25:
    hidden alone left the student worse than scratch; weight 1 beat 0.1 in every staged arm of the sweep)."""
    return LossConfig(kd=1.0, hidden=1.0, last_layer="logits")


def default_stages() -> list[StageConfig]:
    """ERNIE-Tiny's schedule: fine-tune the teacher, then GD -> GED -> TAD -> TSD."""
    latent = latent_loss()
    return [StageConfig("finetune", "teacher", "none", "task", LossConfig(ce=1.0)),
            StageConfig("gd", "student", "pretrained", "general", latent),
            StageConfig("ged", "student", "finetuned", "general", latent),
            StageConfig("tad", "student", "finetuned", "task", latent),
            StageConfig("tsd", "student", "finetuned", "task", LossConfig(ce=1.0, kd=1.0))]


_SHAPE = ("model_type", "vocab_size", "pad_vocab_to", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
          "ffn_size", "max_position_embeddings", "tie_word_embeddings", "hf_overrides")
_PRUNE_TARGETS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size")


@dataclass
class CompressConfig(TrainingSections):
    """The shared training sections (each stage's Trainer run composes them, with the stage's own data, steps,
    LR and batch) and the compression: teachers, data, the student's init, the stages."""

    run_dir: str = "runs/demo/compress"
    """Each stage runs in run_dir/<stage>/; the initial student is written to run_dir/init/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student's shape for init.kind=random (pretrained is set by the stages)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared by every stage; each stage sets max_steps (and optionally the LR) itself."""
    teacher: PathSetting = "runs/demo/llm/final"
    """The pretrained LLM: a save_pretrained directory with the data's tokenizer."""
    finetuned_teacher: PathSetting = ""
    """The teacher already fine-tuned on the task (a save_pretrained directory), for `teacher: finetuned` stages
    when no stage here fine-tunes it: one fine-tune shared by several compress runs."""
    general_data: PathSetting = "runs/demo/data"
    """Packed dataset of general text (data_tools.pack)."""
    task_data: PathSetting = ""
    """Packed dataset of the task (same tokenizer); needed by stages with data: task."""
    data_seed: int = 0
    """Seeds every stage's shuffle order."""
    init: InitConfig = field(default_factory=InitConfig)
    stages: list[StageConfig] = field(default_factory=default_stages)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        check(bool(names), "stages", names, "at least one stage")
        check(len(set(names)) == len(names), "stages", names, "unique names")
        if self.train.z_loss:
            latent_only = [s.name for s in self.stages if not (s.loss.ce or s.loss.kd)]
            check(not latent_only, "train.z_loss", self.train.z_loss, "0 while stages "
                  f"{latent_only} have no ce or kd term (they compute no logits to penalise)")
        check(not self.model.pretrained, "model.pretrained", self.model.pretrained,
              '"" (the student comes from init; each stage starts from the previous one)')
        check_no_effect(self.train, ["max_steps", "patience"], "in a compress config (each stage sets its own)",
                        prefix="train.")
        if any(s.loss.attention for s in self.stages):
            check(self.model.attn_implementation in ("auto", "eager"), "model.attn_implementation",
                  self.model.attn_implementation, "auto or eager: a stage's attention loss reads attention probabilities")
        if self.init.kind != "random":  # the shape comes from the teacher (pruning: only the sizes are targets)
            shape = [n for n in _SHAPE if not (self.init.kind == "prune" and n in _PRUNE_TARGETS)]
            check_no_effect(self.model, shape, f"with init.kind={self.init.kind} (the student's shape comes from "
                                               "the teacher or init.path)", prefix="model.")
        finetuned = bool(self.finetuned_teacher)
        for s in self.stages:
            if s.trains == "teacher" and self.finetuned_teacher:
                raise ConfigError(f"stages: stage {s.name!r} fine-tunes the teacher, but finetuned_teacher="
                                  f"{self.finetuned_teacher} already names one; drop one of them")
            if s.teacher == "finetuned" and not finetuned:
                raise ConfigError(f"stages: stage {s.name!r} distils from the fine-tuned teacher, which no earlier "
                                  "stage (trains: teacher) makes; add one, or set finetuned_teacher")
            finetuned = finetuned or s.trains == "teacher"
            if s.data == "task" and not self.task_data:
                raise ConfigError(f"task_data: empty, but stage {s.name!r} trains on the task data")
        if self.init.kind in ("layers", "prune") and self.init.source == "finetuned" and not self.finetuned_teacher:
            first = next((i for i, s in enumerate(self.stages) if s.trains == "student"), len(self.stages))
            if not any(s.trains == "teacher" for s in self.stages[:first]):
                raise ConfigError("init.source: finetuned, but no stage before the first student stage fine-tunes "
                                  "the teacher (trains: teacher) and finetuned_teacher is empty")
        if self.init.kind == "prune" and self.init.calibration_data == "task" and not self.task_data:
            raise ConfigError("init.calibration_data: task, but task_data is empty")


def _open_data(cfg: CompressConfig) -> dict[str, PackedDataset]:
    data = {"general": PackedDataset.open(cfg.general_data)}
    if cfg.task_data:
        data["task"] = PackedDataset.open(cfg.task_data)
        data["general"].check_tokenizer(data["task"].tokenizer_fingerprint, f"task_data={cfg.task_data}",
                                        "the general and the task data must share one tokenizer")
    return data


def stage_config(cfg: CompressConfig, stage: StageConfig, start: Path, data: PackedDataset) -> TrainerConfig:
    """The Trainer config of one stage: the shared sections as they are, with the stage's run_dir, data, steps, LR
    and batch, and its start."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainingSections)}
    return TrainerConfig(**{
        **shared, "run_dir": str(Path(cfg.run_dir) / stage.name),
        "data": DataConfig(path=str(data.path), seed=cfg.data_seed),
        "model": replace(cfg.model, pretrained=str(start)), "optim": replace(cfg.optim, lr=stage.lr or cfg.optim.lr),
        "train": replace(cfg.train, max_steps=stage.max_steps, patience=stage.patience,
                         micro_batch_size=stage.micro_batch_size or cfg.train.micro_batch_size,
                         grad_accum=stage.grad_accum or cfg.train.grad_accum)})


RECIPE = "compress"
"""The recipe's name in its runs' exported metadata (reports and cards find its description by it)."""
CONFIG = "config.yaml"
"""In run_dir: the resolved config of the latest accepted launch."""
INIT_RECORD = "slm_assist_init.json"
"""In run_dir/init: the settings the initial student was made with, and the teacher blocks it came from."""


@dataclass
class _Step:
    """One stage of a launch: where it runs, what it starts from, whom it distils from, and its Trainer config."""

    stage: StageConfig
    start: Path
    teacher: Path | None
    tcfg: TrainerConfig

    @property
    def final(self) -> Path:
        return Path(self.tcfg.run_dir) / FINAL

    @property
    def finished(self) -> bool:
        return (self.final / META).is_file()


def run(cfg: CompressConfig) -> Path:
    """Run every unfinished stage in order; returns the final student's model directory. Everything is checked
    before anything is written: the inputs, the init, every finished stage against the settings it ran with, and
    an interrupted stage against the config of its checkpoint. Only then is config.yaml written and a stage run."""
    root = Path(cfg.run_dir)
    check_writable(root, "run_dir")
    dist.init()  # before anything rank-dependent: the init is made once, on rank 0
    data = _open_data(cfg)
    pretrained = ModelDir.open(cfg.teacher, "teacher")
    finetuned_dir = ModelDir.open(cfg.finetuned_teacher, "finetuned_teacher") if cfg.finetuned_teacher else None
    _check_plan(cfg, data, [pretrained] + ([finetuned_dir] if finetuned_dir else []))
    owner = RunDir(root)
    dist.on_main(owner.lock)
    try:
        steps = _plan(cfg, root, pretrained.path, finetuned_dir.path if finetuned_dir else None, data)
        source = _init_source(cfg, pretrained.path, finetuned_dir.path if finetuned_dir else None, steps)
        dist.on_main(lambda: _check_launch(cfg, source, steps, root / "init"))
        if dist.is_main():
            owner.write_config(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        origin = None  # the init is made just before the first student stage: it may be cut from a fine-tuned teacher
        for step in steps:
            if origin is None and step.stage.trains == "student":
                origin = _prepare_init(cfg, pretrained, source, data, root / "init")
            if step.finished:
                if dist.is_main():
                    print(f"[{step.stage.name}] finished: {step.final}", flush=True)
            else:
                _run_stage(cfg, step, data[step.stage.data], origin)
        if origin is None:  # no student stage: the init is the result
            _prepare_init(cfg, pretrained, source, data, root / "init")
    finally:
        if dist.is_main():
            owner.unlock()
    return next((s.final for s in reversed(steps) if s.stage.trains == "student"), root / "init")


def _plan(cfg: CompressConfig, root: Path, pretrained: Path, finetuned: Path | None,
          data: dict[str, PackedDataset]) -> list[_Step]:
    """Every stage's start, teacher, Trainer config and record, from the stage list alone (a stage's start is the
    previous student stage's final/, whether it exists yet or not)."""
    steps, student = [], root / "init"
    for stage in cfg.stages:
        start = pretrained if stage.trains == "teacher" else student
        teacher = {"none": None, "pretrained": pretrained, "finetuned": finetuned}[stage.teacher]
        tcfg = stage_config(cfg, stage, start, data[stage.data])
        steps.append(_Step(stage, start, teacher, tcfg))
        if stage.trains == "teacher":
            finetuned = steps[-1].final
        else:
            student = steps[-1].final
    return steps


def _init_source(cfg: CompressConfig, pretrained: Path, finetuned: Path | None, steps: list[_Step]) -> Path:
    """The model a layers or prune init is cut from (init.source); the pretrained teacher for the other kinds (its
    fingerprint is part of the init's identity). A fine-tuned teacher made by a stage need not exist yet."""
    source = cfg.init.source if cfg.init.kind in ("layers", "prune") else "pretrained"
    if source == "pretrained":
        return pretrained
    if source == "finetuned":
        return finetuned or next(s.final for s in steps if s.stage.trains == "teacher")
    return Path(source)


def _check_launch(cfg: CompressConfig, source: Path, steps: list[_Step], init: Path) -> None:
    """The checks of a relaunch, all before anything is written: the init's settings, every finished stage's
    record and Trainer config against this launch, no new stage before a finished one, and an interrupted stage's
    config against its checkpoint."""
    _check_init(cfg, source, init)
    for i, step in enumerate(steps):
        later = [s.stage.name for s in steps[i + 1:] if s.finished]
        if not step.finished and later:
            raise UserError(f"run_dir={cfg.run_dir}: stage {step.stage.name!r} has not run, but the later stage(s) "
                            f"{later} finished without it; a stage cannot be put before finished ones. Use another "
                            f"run_dir, or delete {', '.join(str(Path(cfg.run_dir) / n) for n in later)} to run them "
                            "again")
        where = f"stage {step.stage.name!r} ({Path(step.tcfg.run_dir)})"
        stage_run = RunDir(step.tcfg.run_dir)
        if step.finished:
            _check_finished(step, _stage_record(cfg, step), where)
        checkpoint = stage_run.newest_recorded() if cfg.checkpoint.resume else None
        if checkpoint is not None:  # finished or interrupted: this launch against the config of its last checkpoint
            state = "finished" if step.finished else f"interrupted at {checkpoint.name}"
            inputs = input_fingerprints(to_dict(step.tcfg), path_settings(TrainerConfig), _extra_inputs(step))
            relaunch = stage_run.check_relaunch(launch_config(step.tcfg), inputs, RELAUNCH_RULES, checkpoint,
                                                where=f"{where}, {state}")
            if step.finished and relaunch.overridden:
                raise UserError(f"{where} finished: checkpoint.allow_changes={relaunch.overridden} would change "
                                "nothing it trained, and the run would then say otherwise; use another run_dir")


def _extra_inputs(step: _Step) -> dict[str, str]:
    """What a stage reads besides its Trainer config's paths: its teacher (a resume checks its content)."""
    return {"teacher": str(step.teacher)} if step.teacher is not None and step.stage.teacher != "none" else {}


def _init_identity(cfg: CompressConfig, source: Path) -> dict[str, Any]:
    return {"init": to_dict(cfg.init), "teacher": ModelDir(source).fingerprint(),
            "shape": {k: getattr(cfg.model, k) for k in _SHAPE} if cfg.init.kind in ("random", "prune") else None}


def _check_init(cfg: CompressConfig, source: Path, out: Path) -> None:
    """run_dir/init, when it exists, was made by this tool with this launch's settings (the stages after it
    would otherwise resume on another student)."""
    record = out / INIT_RECORD
    if out.exists() and not record.is_file():
        raise UserError(f"run_dir={cfg.run_dir}: {out} has no {INIT_RECORD}; it was not made by this tool's "
                        "init. Use another run_dir")
    if record.is_file():
        made = json.loads(record.read_text(encoding="utf-8"))
        diff = record_diff(made["identity"], _init_identity(cfg, source))
        if diff:
            raise UserError(f"run_dir={cfg.run_dir}: its init/ was made with other settings ({'; '.join(diff[:3])});"
                            " use another run_dir, or delete it to start over")


def _prepare_init(cfg: CompressConfig, pretrained: ModelDir, source: Path, data: dict[str, PackedDataset],
                  out: Path) -> dict[str, Any]:
    """Make run_dir/init on rank 0 unless it exists (checked by `_check_init`). Returns where its blocks, heads and
    channels came from (make_student): the teacher's, so the latent losses map the student onto them; none when
    the student was cut from a model of another shape than the teacher's."""
    record = out / INIT_RECORD
    if not record.is_file() and dist.is_main():
        torch.manual_seed(cfg.seed)  # a random init must not depend on the process
        calibration = data[cfg.init.calibration_data] if cfg.init.kind == "prune" else data["general"]
        with atomic_output_dir(out, (*MODEL_FILES, INIT_RECORD), field="run_dir/init") as tmp:
            origin = make_student(cfg.init, cfg.model, ModelDir(source, "init.source"), calibration, tmp, cfg.seed)
            # the mapping holds for this launch's teachers: the pretrained one, or one fine-tuned from it
            teachers = {pretrained.fingerprint(), *([ModelDir(cfg.finetuned_teacher).fingerprint()]
                                                    if cfg.finetuned_teacher else [])}
            if origin["cut_from"] not in teachers and not (
                    cfg.init.kind in ("layers", "prune") and _same_shape(ModelDir(source).config(), pretrained.config())):
                origin = dict.fromkeys(origin)
            (tmp / INIT_RECORD).write_text(json.dumps({"identity": _init_identity(cfg, source), **origin},
                                                      indent=2))
    dist.barrier()
    made = json.loads(record.read_text(encoding="utf-8"))
    return {k: made.get(k) for k in ORIGIN}


def _same_shape(a: PretrainedConfig, b: PretrainedConfig) -> bool:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def _stage_record(cfg: CompressConfig, step: _Step) -> dict:
    """What a stage's model card entry says, and what a relaunch compares before skipping the stage (made when the
    stage runs or is checked: its teacher may be an earlier stage's output). Paths are relative to the stage's run
    directory (the record travels with the model), the teacher also by content."""
    stage, start, teacher = step.stage, step.start, step.teacher
    here = Path(step.tcfg.run_dir).absolute()
    return {"name": stage.name, "trains": stage.trains, "summary": _summary(stage, start, teacher, cfg.init.kind),
            "config": to_dict(stage), "start": os.path.relpath(start.absolute(), here),
            "teacher": os.path.relpath(teacher.absolute(), here) if teacher is not None else "",
            "teacher_fingerprint": ModelDir(teacher).fingerprint() if teacher is not None and teacher.is_dir() else None}


def _check_finished(step: _Step, record: dict[str, Any], where: str) -> None:
    """A finished stage is skipped only if it ran with this stage's settings, from the same start, with the same
    teacher (by content); one killed between its export and its record gets the record now."""
    meta = ModelDir(step.final).meta() or {}
    done = next((r for r in reversed(meta.get("stages", [])) if r.get("name") == step.stage.name), None)
    if done is None:
        append_stage(step.final, {**record, "metrics": {"steps": meta.get("step")}})
        return
    keys = ("config", "start", "teacher", "teacher_fingerprint")
    diff = record_diff({k: done.get(k) for k in keys}, {k: record[k] for k in keys})
    if diff:
        raise UserError(f"{where} finished with other settings ({'; '.join(diff[:3])}); delete {step.final.parent} "
                        "(and the later stages) to run it again, or use another run_dir. Nothing was changed on disk")


def _check_plan(cfg: CompressConfig, data: dict[str, PackedDataset], teachers: list[ModelDir]) -> None:
    """`teachers`: the pretrained LLM, then the fine-tuned one if finetuned_teacher names it. Everything the stages will need, checked before the first one starts: one vocabulary, contexts that fit,
    the init's source, every layer map against both models' depths, attention heads that can be grouped, and a
    validation split wherever patience needs one."""
    for d in data.values():
        for t in teachers:
            t.check_vocabulary(d, "the teacher must use the data's tokenizer")
            t.check_context(d.seq_len, "the teacher reads the data's sequences")
    t_cfg = teachers[0].config()  # the pretrained LLM: the layer maps come from it
    src_cfg = t_cfg  # what the init is cut from: a fine-tuned teacher has the pretrained one's shape
    if cfg.init.kind in ("layers", "prune") and cfg.init.source not in ("pretrained", "finetuned"):
        src = ModelDir.open(cfg.init.source, "init.source")
        for d in data.values():
            src.check_vocabulary(d, "the student is cut from it and must use the data's tokenizer")
            src.check_context(d.seq_len, "the student reads the data's sequences")
        src_cfg = src.config()
    if cfg.init.kind == "random":
        n_student, heads = cfg.model.num_layers, cfg.model.num_heads
    elif cfg.init.kind == "layers":
        n_student, heads = len(chosen_layers(cfg.init, src_cfg.num_hidden_layers)), src_cfg.num_attention_heads
    elif cfg.init.kind == "prune":
        check_prune_targets(src_cfg, **prune_targets(cfg.model, src_cfg), axes=cfg.init.axes)
        n_student, heads = cfg.model.num_layers, cfg.model.num_heads
    else:
        src = ModelDir.open(cfg.init.path, "init.path")
        src.check_vocabulary(data["general"], "the student must use the data's tokenizer")
        s_cfg = src.config()
        n_student, heads = s_cfg.num_hidden_layers, s_cfg.num_attention_heads
    for stage in cfg.stages:
        field = f"stages.{stage.name}"
        if stage.trains == "student" and (stage.loss.hidden or stage.loss.attention):
            layer_map(n_student, t_cfg.num_hidden_layers, stage.loss.layer_map, stage.loss.map_embeddings,
                      f"{field}.loss.layer_map")
        if stage.loss.attention and t_cfg.num_attention_heads % heads:
            raise UserError(f"{field}.loss.attention={stage.loss.attention}: the teacher's "
                            f"{t_cfg.num_attention_heads} attention heads cannot be grouped onto the student's {heads}")
        if stage.patience and not (stage.loss.ce or stage.loss.kd):
            raise UserError(f"{field}.patience={stage.patience}: early stopping watches the validation CE, which "
                            "a stage without ce or kd does not train; set it to 0 or add a ce/kd term")
        if stage.patience and not data[stage.data].has_split("validation"):
            raise UserError(f"{field}.patience={stage.patience}: the {stage.data} data ({data[stage.data].path}) "
                            "has no validation split")
    if "task" in data and dist.is_main():
        _warn_overlap(cfg, data)


OVERLAP_WARNING = 0.01
"""The share of the task's 16-token spans found in the general data above which a launch warns."""


def _warn_overlap(cfg: CompressConfig, data: dict[str, PackedDataset]) -> None:
    """General stages that read the task's text blur what the task stages add, and a task validation split the
    general data contains is no longer held out: say how much of the task the general data holds."""
    share, searched = shared_span_share(data["task"], data["general"])
    if share > OVERLAP_WARNING:
        sample = "" if searched >= 1 else f" (in a sample of {searched:.0%} of its rows)"
        print(f"warning: task_data={cfg.task_data}: {share:.1%} of its 16-token spans also occur in general_data="
              f"{cfg.general_data}{sample}; the general stages see the task's text, and its validation split may not "
              "be held out", flush=True)


def _run_stage(cfg: CompressConfig, step: _Step, data: PackedDataset, origin: dict[str, Any] | None) -> None:
    run_data = RunData(step.tcfg, inputs=_extra_inputs(step))
    try:
        trainer = _stage_trainer(cfg, step, data, origin, run_data)
    except BaseException:
        run_data.release()
        raise
    result = trainer.fit()
    if dist.is_main():  # a student's origin travels with it: a later compress run may start from it (init: model)
        carried = origin if step.stage.trains == "student" and origin and origin.get("cut_from") else None
        append_stage(step.final, {**_stage_record(cfg, step), **({"origin": carried} if carried else {}),
                                  "metrics": {"val_loss": result["val_loss"], "steps": result["step"]}})
    dist.barrier()
    del trainer
    gc.collect()


def _stage_trainer(cfg: CompressConfig, step: _Step, data: PackedDataset, origin: dict[str, Any] | None,
                   run_data: RunData) -> Trainer:
    """The Trainer of a stage: its teacher loaded, its objective built (the student's blocks and heads mapped to
    the teacher's they came from)."""
    stage = step.stage
    teacher = None
    if step.teacher is not None:
        teacher = load_teacher(step.teacher, data, run_data.device, f"{stage.teacher} teacher", cfg.train.dtype,
                               attn_implementation="eager" if stage.loss.attention else None)
        if dist.is_main():
            gib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30
            dtype = next(teacher.parameters()).dtype
            print(f"[{stage.name}] teacher {step.teacher}: {gib:.2f} GiB of weights per rank ({dtype})", flush=True)
    student_config = ModelDir.open(step.start).config()
    # a student copied or pruned from the teacher learns each block (and head) from the one it came from
    origin = origin if stage.trains == "student" else {}  # a teacher stage may run before the init is made
    blocks = origin.get("teacher_blocks")
    mapped = blocks and len(blocks) == student_config.num_hidden_layers
    objective = CompressObjective(stage.loss, teacher, student_config, len(data.tokenizer), f"stages.{stage.name}.loss",
                                  default_map=blocks if mapped else None,
                                  head_map=origin["teacher_heads"] if mapped else None, z_loss=cfg.train.z_loss,
                                  kept_channels=origin.get("teacher_channels"))
    return Trainer(step.tcfg, objective, data=run_data, recipe=RECIPE)


def _summary(stage: StageConfig, start: Path, teacher: Path | None, init: str) -> str:
    loss = stage.loss
    terms = [f"{w}·{name}" for name, w in (("CE", loss.ce), (f"KD[{loss.kind}, τ={loss.tau}]", loss.kd),
                                           (f"hidden[{loss.hidden_kind}]", loss.hidden),
                                           ("attention-KL", loss.attention)) if w]
    who = "fine-tunes the teacher" if stage.trains == "teacher" else "trains the student"
    if start.name == "init":
        who += f" (init: {init})"
    source = "no teacher" if teacher is None else f"teacher `{path_name(teacher)}` ({stage.teacher})"
    return (f"{who} from `{path_name(start)}` on the {stage.data} data for {stage.max_steps} steps; {source}; "
            f"loss {' + '.join(terms)}")
