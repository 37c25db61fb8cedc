"""Progressive distillation (ERNIE-Tiny): a list of stages, each an ordinary Trainer run under
`run_dir/<stage>/`, changing one of teacher, data and loss at a time. The student carries over from stage to stage;
a `trains: teacher` stage fine-tunes the pretrained LLM on the task data to make the "fine-tuned teacher" of the
later stages. A relaunch skips finished stages (their final/ exists) and resumes the unfinished one exactly.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from slm_assist.compress.init import InitConfig, chosen_layers, make_student, prune_targets
from slm_assist.compress.latent import layer_map
from slm_assist.compress.objective import CompressObjective, LossConfig
from slm_assist.compress.prune import check_prune_targets
from slm_assist.core import dist
from slm_assist.core.config import check, check_no_effect, record_diff, save_config, to_dict
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import ConfigError, UserError
from slm_assist.core.files import atomic_output_dir, check_writable
from slm_assist.core.model_dir import META, MODEL_FILES, ModelDir, append_stage
from slm_assist.kd.teacher import load_teacher
from slm_assist.training.batches import DataConfig
from slm_assist.training.checkpoint import CheckpointConfig
from slm_assist.training.models import ModelConfig
from slm_assist.training.optim import OptimConfig, ScheduleConfig
from slm_assist.training.trainer import RunData, TrainConfig, Trainer, TrainerConfig


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
    loss: LossConfig = field(default_factory=lambda: LossConfig(hidden=1.0))
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


def default_stages() -> list[StageConfig]:
    """ERNIE-Tiny's schedule: fine-tune the teacher, then GD -> GED -> TAD -> TSD."""
    latent = LossConfig(hidden=1.0)
    return [StageConfig("finetune", "teacher", "none", "task", LossConfig(ce=1.0)),
            StageConfig("gd", "student", "pretrained", "general", latent),
            StageConfig("ged", "student", "finetuned", "general", latent),
            StageConfig("tad", "student", "finetuned", "task", latent),
            StageConfig("tsd", "student", "finetuned", "task", LossConfig(ce=1.0, kd=1.0, hidden=1.0))]


_SHAPE = ("model_type", "vocab_size", "pad_vocab_to", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
          "ffn_size", "max_position_embeddings", "tie_word_embeddings", "hf_overrides")
_PRUNE_TARGETS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size")


@dataclass
class CompressConfig:
    run_dir: str = "runs/demo/compress"
    """Each stage runs in run_dir/<stage>/; the initial student is written to run_dir/init/."""
    seed: int = 0
    teacher: str = "runs/demo/llm/final"
    """The pretrained LLM: a save_pretrained directory with the data's tokenizer."""
    finetuned_teacher: str = ""
    """The teacher already fine-tuned on the task (a save_pretrained directory), for `teacher: finetuned` stages
    when no stage here fine-tunes it: one fine-tune shared by several compress runs."""
    general_data: str = "runs/demo/data"
    """Packed dataset of general text (data_tools.pack)."""
    task_data: str = ""
    """Packed dataset of the task (same tokenizer); needed by stages with data: task."""
    data_seed: int = 0
    """Seeds every stage's shuffle order."""
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student's shape for init.kind=random (pretrained is set by the stages)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared by every stage; each stage sets max_steps (and optionally the LR) itself."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
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


def _open_data(cfg: CompressConfig) -> dict[str, PackedDataset]:
    data = {"general": PackedDataset.open(cfg.general_data)}
    if cfg.task_data:
        data["task"] = PackedDataset.open(cfg.task_data)
        data["task"].check_tokenizer(data["general"].tokenizer_fingerprint, f"task_data={cfg.task_data}",
                                     f"general_data={cfg.general_data} and the task data must share one tokenizer")
    return data


def stage_config(cfg: CompressConfig, stage: StageConfig, start: Path, data: PackedDataset) -> TrainerConfig:
    """The Trainer config of one stage: the shared sections, the stage's data, steps, LR and batch, its start."""
    return TrainerConfig(
        run_dir=str(Path(cfg.run_dir) / stage.name), seed=cfg.seed,
        data=DataConfig(path=str(data.path), seed=cfg.data_seed),
        model=replace(cfg.model, pretrained=str(start)),
        optim=replace(cfg.optim, lr=stage.lr or cfg.optim.lr), schedule=cfg.schedule,
        train=replace(cfg.train, max_steps=stage.max_steps, patience=stage.patience,
                      micro_batch_size=stage.micro_batch_size or cfg.train.micro_batch_size,
                      grad_accum=stage.grad_accum or cfg.train.grad_accum), checkpoint=cfg.checkpoint)


CONFIG = "config.yaml"
"""In run_dir: the resolved config of the latest launch (reports read the stages and data from it)."""
INIT_RECORD = "slm_assist_init.json"
"""In run_dir/init: the settings the initial student was made with, and the teacher blocks it came from."""


def run(cfg: CompressConfig) -> Path:
    """Run every unfinished stage in order; returns the final student's model directory. Everything is checked
    before the first stage starts; a finished stage is skipped only if it ran with the same settings."""
    root = Path(cfg.run_dir)
    check_writable(root, "run_dir")
    dist.init()  # before anything rank-dependent: the init is made once, on rank 0
    data = _open_data(cfg)
    pretrained = ModelDir.open(cfg.teacher, "teacher")
    finetuned_dir = ModelDir.open(cfg.finetuned_teacher, "finetuned_teacher") if cfg.finetuned_teacher else None
    _check_plan(cfg, data, [pretrained] + ([finetuned_dir] if finetuned_dir else []))
    if dist.is_main():
        save_config(cfg, root / CONFIG)
    origin = _prepare_init(cfg, pretrained, data["general"], root / "init")
    student = root / "init"
    finetuned = finetuned_dir.path if finetuned_dir else None
    for stage in cfg.stages:
        final = root / stage.name / "final"
        start = pretrained.path if stage.trains == "teacher" else student
        teachers = {"pretrained": pretrained.path, "finetuned": finetuned}
        record = _stage_record(cfg, stage, start, teachers)
        if (final / META).is_file():
            _check_finished(final, record)
        else:
            _run_stage(cfg, stage, start, teachers, data[stage.data], record, origin)
        if stage.trains == "teacher":
            finetuned = final
        else:
            student = final
    return student


def _prepare_init(cfg: CompressConfig, pretrained: ModelDir, data: PackedDataset, out: Path) -> dict[str, Any]:
    """Make run_dir/init on rank 0, or reuse it when the same settings made it (an error otherwise: the stages
    after it would resume on another student). Returns where its blocks and heads came from (make_student)."""
    identity = {"init": to_dict(cfg.init), "teacher": pretrained.fingerprint(),
                "shape": {k: getattr(cfg.model, k) for k in _SHAPE} if cfg.init.kind in ("random", "prune") else None}
    record = out / INIT_RECORD
    if out.exists() and not record.is_file():  # every rank checks: none may wait at the barrier for a failed one
        raise UserError(f"run_dir={cfg.run_dir}: {out} has no {INIT_RECORD}; it was not made by this tool's "
                        "init. Use another run_dir")
    if not record.is_file() and dist.is_main():
        torch.manual_seed(cfg.seed)  # a random init (and pruning's calibration) must not depend on the process
        with atomic_output_dir(out, (*MODEL_FILES, INIT_RECORD), field="run_dir/init") as tmp:
            origin = make_student(cfg.init, cfg.model, pretrained, data, tmp)
            (tmp / INIT_RECORD).write_text(json.dumps({"identity": identity, **origin}, indent=2))
    dist.barrier()
    made = json.loads(record.read_text(encoding="utf-8"))
    diff = record_diff(made["identity"], identity)
    if diff:
        raise UserError(f"run_dir={cfg.run_dir}: its init/ was made with other settings ({'; '.join(diff[:3])}); "
                        "use another run_dir, or delete it to start over")
    return {"teacher_blocks": made.get("teacher_blocks"), "teacher_heads": made.get("teacher_heads")}


def _stage_record(cfg: CompressConfig, stage: StageConfig, start: Path, teachers: dict[str, Path | None]) -> dict:
    """What a stage's model card entry says, and what a relaunch compares before skipping the stage."""
    return {"name": stage.name, "trains": stage.trains, "summary": _summary(stage, start, teachers, cfg.init.kind),
            "config": to_dict(stage), "start": str(start), "teacher": str(teachers.get(stage.teacher) or "")}


def _check_finished(final: Path, record: dict) -> None:
    """A finished stage is skipped only if it ran with this stage's settings from the same start; one killed
    between its export and its record gets the record now."""
    meta = ModelDir(final).meta() or {}
    done = next((r for r in reversed(meta.get("stages", [])) if r.get("name") == record["name"]), None)
    if done is None:
        if dist.is_main():
            append_stage(final, {**record, "metrics": {"steps": meta.get("step")}})
        dist.barrier()
    else:
        diff = record_diff({k: done.get(k) for k in ("config", "start", "teacher")},
                     {k: record[k] for k in ("config", "start", "teacher")})
        if diff:
            raise UserError(f"stage {record['name']!r} finished in {final.parent} with other settings "
                            f"({'; '.join(diff[:3])}); delete {final.parent} (and the later stages) to run it again, "
                            "or use another run_dir")
    if dist.is_main():
        print(f"[{record['name']}] finished: {final}", flush=True)


def _check_plan(cfg: CompressConfig, data: dict[str, PackedDataset], teachers: list[ModelDir]) -> None:
    """`teachers`: the pretrained LLM, then the fine-tuned one if finetuned_teacher names it. Everything the stages will need, checked before the first one starts: one vocabulary, contexts that fit,
    the init's source, every layer map against both models' depths, attention heads that can be grouped, and a
    validation split wherever patience needs one."""
    for d in data.values():
        for t in teachers:
            t.check_vocabulary(d, "the teacher must use the data's tokenizer")
            t.check_context(d.seq_len, "the teacher reads the data's sequences")
    t_cfg = teachers[0].config()  # the pretrained LLM: the init and the layer maps come from it
    if cfg.init.kind == "random":
        n_student, heads = cfg.model.num_layers, cfg.model.num_heads
    elif cfg.init.kind == "layers":
        n_student, heads = len(chosen_layers(cfg.init, t_cfg.num_hidden_layers)), t_cfg.num_attention_heads
    elif cfg.init.kind == "prune":
        check_prune_targets(t_cfg, **prune_targets(cfg.model, t_cfg))
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


def _run_stage(cfg: CompressConfig, stage: StageConfig, start: Path, teachers: dict[str, Path | None],
               data: PackedDataset, record: dict, origin: dict[str, Any]) -> None:
    tcfg = stage_config(cfg, stage, start, data)
    run_data = RunData(tcfg)
    teacher = None
    if stage.teacher != "none":
        dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32  # bf16 halves its memory
        teacher = load_teacher(teachers[stage.teacher], data, run_data.device, f"{stage.teacher} teacher",
                               dtype=dtype, attn_implementation="eager" if stage.loss.attention else None)
        if dist.is_main():
            gib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30
            print(f"[{stage.name}] teacher {teachers[stage.teacher]}: {gib:.2f} GiB of weights per rank ({dtype})",
                  flush=True)
    student_config = ModelDir.open(start).config()
    # a student copied or pruned from the teacher learns each block (and head) from the one it came from
    blocks = origin["teacher_blocks"]
    mapped = stage.trains == "student" and blocks and len(blocks) == student_config.num_hidden_layers
    objective = CompressObjective(stage.loss, teacher, student_config, len(data.tokenizer), f"stages.{stage.name}.loss",
                                  default_map=blocks if mapped else None,
                                  head_map=origin["teacher_heads"] if mapped else None)
    trainer = Trainer(tcfg, objective, data=run_data)
    result = trainer.fit()
    if dist.is_main():
        append_stage(Path(tcfg.run_dir) / "final",
                     {**record, "metrics": {"val_loss": result["val_loss"], "steps": result["step"]}})
    dist.barrier()
    del trainer, objective, teacher
    gc.collect()


def _summary(stage: StageConfig, start: Path, teachers: dict[str, Path | None], init: str) -> str:
    loss = stage.loss
    terms = [f"{w}·{name}" for name, w in (("CE", loss.ce), (f"KD[{loss.kind}, τ={loss.tau}]", loss.kd),
                                           (f"hidden[{loss.hidden_kind}]", loss.hidden),
                                           ("attention-KL", loss.attention)) if w]
    teacher = "no teacher" if stage.teacher == "none" else f"teacher `{teachers[stage.teacher]}` ({stage.teacher})"
    who = "fine-tunes the teacher" if stage.trains == "teacher" else "trains the student"
    if start.name == "init":
        who += f" (init: {init})"
    return (f"{who} from `{start}` on the {stage.data} data for {stage.max_steps} steps; {teacher}; "
            f"loss {' + '.join(terms)}")
