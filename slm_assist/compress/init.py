"""Student inits: where the first stage's student comes from. Each writes an ordinary model directory (with the
data's tokenizer), which the first stage starts from as `model.pretrained`.

- random: a fresh model of the student shape (the `model` section).
- layers: a copy of chosen teacher blocks (every k-th by default) with the embeddings, final norm and head.
- prune:  Minitron-style structured pruning of the teacher to the `model` section's width and depth (prune.py).
- model:  any save_pretrained directory with the same tokenizer, e.g. the SALT SLM that helped pretrain the LLM.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from slm_assist.compress.prune import importance, prune
from slm_assist.core import dist
from slm_assist.core.config import PathSetting, check, check_no_effect
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import ModelDir, write_model_dir
from slm_assist.training.models import ModelConfig, build_model

# a block's parameters: model.layers.<i>. (llama, qwen2, mistral...), transformer.h.<i>. (gpt2)
if TYPE_CHECKING:
    from transformers import PretrainedConfig

_BLOCK = re.compile(r"^(.*?\.(?:layers|h))\.(\d+)\.(.*)$")


@dataclass
class InitConfig:
    kind: Literal["random", "layers", "prune", "model"] = "random"
    """random: a fresh student of the `model` shape; layers: copy teacher blocks; prune: prune the teacher to the
    `model` section's hidden_size, num_layers, num_heads, num_kv_heads and ffn_size; model: start from `path`."""
    layers: list[int] = field(default_factory=list)
    """layers: the teacher blocks to copy (1-based, in order); [] = every `every`-th, ending at the last."""
    every: int = 2
    """layers: with layers=[], copy every k-th teacher block."""
    path: PathSetting = ""
    """model: a save_pretrained directory sharing the data's tokenizer (e.g. the SALT SLM's final/)."""
    calibration: int = 256
    """prune: calibration sequences (from the train split of `calibration_data`) that importance is measured on."""
    calibration_data: Literal["general", "task"] = "general"
    """prune: which data importance is measured on."""
    source: str = "pretrained"
    """layers, prune: the model the student is cut from: pretrained (`teacher`), finetuned (the fine-tuned
    teacher: a `trains: teacher` stage before the first student stage, or finetuned_teacher; Minitron's "teacher
    correction"), or a model directory with the data's tokenizer."""
    axes: Literal["both", "width", "depth"] = "both"
    """prune: what may shrink. width: hidden size, heads, FFN (model.num_layers must be the source's); depth:
    whole blocks (the width fields must be the source's); both. Minitron finds width better after distillation."""

    def __post_init__(self) -> None:
        check(self.every >= 1, "every", self.every, ">= 1")
        if self.kind != "layers":
            check_no_effect(self, ["layers", "every"], f"with init.kind={self.kind}")
        elif self.layers:
            check_no_effect(self, ["every"], "with an explicit init.layers")
            check(all(a < b for a, b in zip(self.layers, self.layers[1:])), "layers", self.layers,
                  "teacher blocks in increasing order, each once")
        if self.kind != "model":
            check_no_effect(self, ["path"], f"with init.kind={self.kind}")
        else:
            check(bool(self.path), "path", self.path, "a model directory with init.kind=model")
        if self.kind != "prune":
            check_no_effect(self, ["calibration", "calibration_data", "axes"], f"with init.kind={self.kind}")
        if self.kind not in ("layers", "prune"):
            check_no_effect(self, ["source"], f"with init.kind={self.kind}")
        check(bool(self.source), "source", self.source, "pretrained, finetuned or a model directory")
        check(self.calibration > 0, "calibration", self.calibration, "> 0")


def chosen_layers(cfg: InitConfig, n_teacher: int) -> list[int]:
    """The teacher blocks a `layers` init copies (1-based): explicit, or every k-th counted back from the last."""
    if cfg.layers:
        bad = [i for i in cfg.layers if not 1 <= i <= n_teacher]
        if bad:
            raise UserError(f"init.layers={cfg.layers}: block {bad[0]} is outside 1..{n_teacher} (the teacher has "
                            f"{n_teacher} blocks)")
        return list(cfg.layers)
    return sorted(range(n_teacher, 0, -cfg.every))


def copy_layers(teacher: torch.nn.Module, blocks: list[int]) -> torch.nn.Module:
    """A model of the teacher's architecture with only `blocks` (1-based), and its embeddings, final norm and
    head: exact, so keeping every block reproduces the teacher."""
    from transformers import AutoModelForCausalLM

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(blocks)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (e.g. sliding windows)
        config.layer_types = [teacher.config.layer_types[i - 1] for i in blocks]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype,
                                               attn_implementation=teacher.config._attn_implementation)
    new_index = {old - 1: new for new, old in enumerate(blocks)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _BLOCK.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}.{new_index[int(m.group(2))]}.{m.group(3)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise UserError(f"init.kind=layers: cannot map the teacher's weights onto {len(blocks)} blocks of "
                        f"{config.model_type} (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    return student


def prune_targets(model: ModelConfig, teacher_config: PretrainedConfig) -> dict[str, int]:
    """The pruned shape from the `model` section; num_kv_heads -1 keeps the teacher's query heads per KV head."""
    per_group = teacher_config.num_attention_heads // teacher_config.num_key_value_heads
    kv = model.num_kv_heads if model.num_kv_heads > 0 else max(1, model.num_heads // per_group)
    return {"hidden": model.hidden_size, "layers": model.num_layers, "heads": model.num_heads, "kv_heads": kv,
            "ffn": model.ffn_size}


ORIGIN = ("teacher_blocks", "teacher_heads", "teacher_channels", "cut_from")
"""What a student's origin record says (make_student): where its blocks, heads and channels came from."""


def make_student(cfg: InitConfig, model: ModelConfig, teacher_dir: ModelDir | None, data: PackedDataset,
                 out: Path, seed: int = 0) -> dict[str, Any]:
    """Write the initial student into `out` (a directory the caller renames into place when complete), cut from
    `teacher_dir` (init.source) for layers and prune, calibrated on `data`. Returns where its parts came from
    (`ORIGIN`): `teacher_blocks` (1-based, for layers and prune), `teacher_heads` (per block, the teacher's query
    heads in the student's order) and `teacher_channels` (the teacher channel of each student channel), for prune;
    `cut_from`, the fingerprint of the model they index into. A `model` init made by an earlier compress run (a
    general student) inherits its origin from its exported metadata. None where it does not apply."""
    tok = data.tokenizer
    if cfg.kind == "model":
        src = ModelDir.open(cfg.path, "init.path")
        src.check_vocabulary(data, "the student must use the data's tokenizer")
        src.check_context(data.seq_len, "the student reads the data's sequences")
        shutil.copytree(src.path, out, dirs_exist_ok=True)
        stages = (src.meta() or {}).get("stages") or [{}]
        return {**dict.fromkeys(ORIGIN), **(stages[-1].get("origin") or {})}
    blocks = heads = channels = None
    if cfg.kind == "random":
        student = build_model(model, tok, torch.device("cpu"))
    else:
        if teacher_dir is None:
            raise UserError(f"init.kind={cfg.kind} needs the teacher (teacher=...)")
        # weights are copied or sliced on the CPU as saved (exact); calibration runs on the accelerator in bf16
        teacher = teacher_dir.load(torch.device("cpu"), len(tok), dtype="auto", attn_implementation=None).eval()
        if cfg.kind == "layers":
            blocks = chosen_layers(cfg, teacher.config.num_hidden_layers)
            student = copy_layers(teacher, blocks)
        else:
            device = dist.device()
            calib = teacher if device.type == "cpu" else teacher_dir.load(
                device, len(tok), dtype=torch.bfloat16, attn_implementation=None).eval()
            rows = data.split("train")
            picked = calibration_rows(len(rows), cfg.calibration, seed)
            batches = (torch.from_numpy(np.asarray(rows.select(picked[i : i + 8])["input_ids"], dtype=np.int64))
                       for i in range(0, len(picked), 8))
            imp = importance(calib, batches)
            del calib
            pruned = prune(teacher, imp, **prune_targets(model, teacher.config))
            student, blocks, heads, channels = pruned.model, pruned.blocks, pruned.heads, pruned.channels
    write_model_dir(out, student, tok, None)
    return {"teacher_blocks": blocks, "teacher_heads": heads, "teacher_channels": channels,
            "cut_from": teacher_dir.fingerprint() if blocks is not None else None}


def calibration_rows(n_rows: int, n: int, seed: int) -> list[int]:
    """The calibration sequences of a prune init: `n` of the split's rows drawn by the run's seed (in order), so
    that seeds differ in what importance is measured on, not only in data order."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_rows, size=min(n, n_rows), replace=False).tolist())
