"""Progressive distillation (ERNIE-Tiny): a list of stages, each an ordinary Trainer run under
`run_dir/<stage>/`, changing one of teacher, data and loss at a time. The student carries over from stage to stage;
a `trains: teacher` stage fine-tunes the pretrained LLM on the task data to make the "fine-tuned teacher" of the
later stages. A relaunch skips finished stages (their final/ exists) and resumes the unfinished one exactly.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from slm_assist.compress.init import InitConfig, chosen_layers, make_student, prune_targets
from slm_assist.compress.latent import layer_map
from slm_assist.compress.objective import CompressObjective, LossConfig
from slm_assist.compress.prune import check_prune_targets
from slm_assist.core import dist
from slm_assist.core.config import check, check_no_effect
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import ConfigError
from slm_assist.core.files import atomic_output_dir, check_writable
from slm_assist.core.model_dir import META, ModelDir, append_stage
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
    patience: int = 0
    """End the stage early once its validation loss has not improved for this many evaluations, so the budget
    moves to the next stage (0 = off, the whole max_steps)."""

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name and not self.name.startswith("."), "name", self.name,
              "a directory name")
        check(self.max_steps > 0, "max_steps", self.max_steps, "> 0")
        check(self.lr >= 0, "lr", self.lr, ">= 0 (0 = optim.lr)")
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
        finetuned = False
        for s in self.stages:
            if s.teacher == "finetuned" and not finetuned:
                raise ConfigError(f"stages: stage {s.name!r} distils from the fine-tuned teacher, which no earlier "
                                  "stage (trains: teacher) makes")
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
    """The Trainer config of one stage: the shared sections, the stage's data, steps and LR, its start."""
    return TrainerConfig(
        run_dir=str(Path(cfg.run_dir) / stage.name), seed=cfg.seed,
        data=DataConfig(path=str(data.path), seed=cfg.data_seed),
        model=replace(cfg.model, pretrained=str(start)),
        optim=replace(cfg.optim, lr=stage.lr or cfg.optim.lr), schedule=cfg.schedule,
        train=replace(cfg.train, max_steps=stage.max_steps, patience=stage.patience), checkpoint=cfg.checkpoint)


def _load_teacher(path: Path, data: PackedDataset, cfg: CompressConfig, stage: StageConfig, device: torch.device):
    """The stage's frozen teacher in the training dtype (bf16 halves its memory), eager attention when the
    attention loss reads its probabilities."""
    d = ModelDir.open(path, f"{stage.name}.teacher")
    d.check_vocabulary(data, "distillation needs one vocabulary")
    d.check_context(data.seq_len, "the teacher reads the student's sequences")
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    teacher = d.load(device, len(data.tokenizer), dtype=dtype, attn_implementation="eager" if stage.loss.attention
                     else None).eval().requires_grad_(False)
    if dist.is_main():
        gib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30
        print(f"[{stage.name}] teacher {path}: {gib:.2f} GiB of weights per rank ({dtype})", flush=True)
    return teacher


def run(cfg: CompressConfig) -> Path:
    """Run every unfinished stage in order; returns the final student's model directory."""
    root = Path(cfg.run_dir)
    check_writable(root, "run_dir")
    data = _open_data(cfg)
    pretrained = ModelDir.open(cfg.teacher, "teacher")
    _check_plan(cfg, data, pretrained)
    student, finetuned = root / "init", None
    if dist.is_main() and not (student / META).is_file() and not (student / "config.json").is_file():
        torch.manual_seed(cfg.seed)  # a random init (and pruning's calibration) must not depend on the process
        with atomic_output_dir(student, overwrite=True, field="run_dir/init") as tmp:
            make_student(cfg.init, cfg.model, pretrained, data["general"], tmp)
    dist.barrier()
    for stage in cfg.stages:
        final = root / stage.name / "final"
        start = pretrained.path if stage.trains == "teacher" else student
        if (final / META).is_file():
            if dist.is_main():
                print(f"[{stage.name}] finished: {final}", flush=True)
        else:
            _run_stage(cfg, stage, start, {"pretrained": pretrained.path, "finetuned": finetuned}, data[stage.data])
        if stage.trains == "teacher":
            finetuned = final
        else:
            student = final
    return student


def _check_plan(cfg: CompressConfig, data: dict[str, PackedDataset], pretrained: ModelDir) -> None:
    """Everything the stages will need, checked before the first one starts: one vocabulary, contexts that fit,
    the init's source, and every layer map against both models' depths."""
    for d in data.values():
        pretrained.check_vocabulary(d, "the teacher must use the data's tokenizer")
        pretrained.check_context(d.seq_len, "the teacher reads the data's sequences")
    n_teacher = pretrained.config().num_hidden_layers
    if cfg.init.kind == "random":
        n_student = cfg.model.num_layers
    elif cfg.init.kind == "layers":
        n_student = len(chosen_layers(cfg.init, n_teacher))
    elif cfg.init.kind == "prune":
        n_student = cfg.model.num_layers
        targets = prune_targets(cfg.model, pretrained.config())
        check_prune_targets(pretrained.config(), **targets)
    else:
        src = ModelDir.open(cfg.init.path, "init.path")
        src.check_vocabulary(data["general"], "the student must use the data's tokenizer")
        n_student = src.config().num_hidden_layers
    for stage in cfg.stages:
        if stage.trains == "student" and (stage.loss.hidden or stage.loss.attention):
            layer_map(n_student, n_teacher, stage.loss.layer_map, stage.loss.map_embeddings,
                      f"stages.{stage.name}.loss.layer_map")


def _run_stage(cfg: CompressConfig, stage: StageConfig, start: Path, teachers: dict[str, Path | None],
               data: PackedDataset) -> None:
    tcfg = stage_config(cfg, stage, start, data)
    run_data = RunData(tcfg)
    teacher = None
    if stage.teacher != "none":
        teacher = _load_teacher(teachers[stage.teacher], data, cfg, stage, run_data.device)
    student_config = ModelDir.open(start).config()
    objective = CompressObjective(stage.loss, teacher, student_config, len(data.tokenizer), f"stages.{stage.name}.loss")
    trainer = Trainer(tcfg, objective, data=run_data)
    result = trainer.fit()
    if dist.is_main():
        append_stage(Path(tcfg.run_dir) / "final", {
            "name": stage.name, "summary": _summary(stage, start, teachers, cfg.init.kind),
            "metrics": {"val_loss": result["val_loss"], "steps": result["step"]}})
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
