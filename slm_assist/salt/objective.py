"""SALT's objective: (1 - w_t)·CE + w_t·KD(student, soft targets; tau) = the KD-weight schedule x a soft-target
source (online SLM, its cached labels, or the smoothed one-hot control) x the fused CE+KD loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slm_assist.core import dist
from slm_assist.core.config import PathSetting, check, check_no_effect
from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import decoder_and_head
from slm_assist.kd.fused_linear import fused_linear_ce_kd
from slm_assist.kd.latent import Projections, hidden_loss
from slm_assist.kd.losses import KDLossConfig, chunk_tokens, mixed_ce_kd
from slm_assist.kd.schedule import KDScheduleConfig, kd_weight
from slm_assist.kd.sources import SoftTargetSource
from slm_assist.training.batches import Batch
from slm_assist.training.objective import Objective, ce_with_z_loss, eval_loss


@dataclass
class SourceConfig:
    """Where the KD term's soft targets come from: one choice, each kind with its own settings."""

    kind: Literal["none", "teacher", "cache", "label_smoothing"] = "none"
    """none: plain CE pretraining (no KD term). teacher: the SLM run online. cache: its soft labels cached by
    data_tools.score. label_smoothing: the control arm, the one-hot smoothed by `epsilon` instead of an SLM."""
    teachers: list[PathSetting] = field(default_factory=list)
    """kind=teacher: the SLM model dir(s) (save_pretrained with its tokenizer); more than one is an ensemble
    (MEAL V2) combined by `combine`."""
    caches: list[PathSetting] = field(default_factory=list)
    """kind=cache: data_tools.score dirs with a soft-label cache of this data (top_k or sampled; the teacher at
    temperature 1, so loss.kind forward_kl and tau 1); more than one (top_k) is an ensemble: the union of their
    top-k ids, each one's tail mass in the tail bucket."""
    combine: Literal["mean", "vote"] = "mean"
    """An ensemble's combination: mean of the members' probabilities, or vote (committee voting): per token, the
    average of the members whose top-1 is the majority's (a tie goes to the more confident group)."""
    epsilon: float = 0.0
    """kind=label_smoothing: the smoothing epsilon, in (0, 1). The gap to SALT is the part owed to the SLM's
    knowledge rather than to regularisation."""

    def __post_init__(self) -> None:
        unused = {"none": ["teachers", "caches", "combine", "epsilon"], "teacher": ["caches", "epsilon"],
                  "cache": ["teachers", "epsilon"], "label_smoothing": ["teachers", "caches", "combine"]}[self.kind]
        check_no_effect(self, unused, f"with kind={self.kind}")
        if self.kind == "teacher":
            check(bool(self.teachers), "teachers", self.teachers, "at least one model dir with kind=teacher")
        if self.kind == "cache":
            check(bool(self.caches), "caches", self.caches, "at least one data_tools.score dir with kind=cache")
        if self.kind == "label_smoothing":
            check(0 < self.epsilon < 1, "epsilon", self.epsilon, "in (0, 1) with kind=label_smoothing")
        if len(self.members) < 2:
            check_no_effect(self, ["combine"], "with one teacher or cache (combine is an ensemble's)")

    @property
    def members(self) -> list[str]:
        return self.teachers or self.caches


@dataclass
class GateConfig:
    """Per-token gates (beyond the paper): KD only where the SLM's soft label is likely to help, CE elsewhere,
    since soft labels add bias where the SLM is wrong."""

    topk: int = 0
    """KD only on tokens whose target is in the teacher's top-k. 0 = off."""
    confidence: float = 0.0
    """KD off on tokens where the SLM is confidently wrong (its top-1 is not the target and has probability >=
    this). 0 = off."""

    def __post_init__(self) -> None:
        check(self.topk >= 0, "topk", self.topk, ">= 0 (0 = off)")
        check(0 <= self.confidence < 1, "confidence", self.confidence, "in [0, 1) (0 = off)")


@dataclass
class KDDataConfig:
    """What the KD phase draws: a selected subset, in an order."""

    selection: PathSetting = ""
    """A data_tools.select index.npy: KD-phase batches come from these sequences, later ones from the full split
    ("" = the full split throughout)."""
    curriculum: Literal["none", "mean_loss", "salt_ds"] = "none"
    """Easy-to-hard curriculum (Easy2Hard): the sequences the KD phase draws are ordered by this SLM score,
    ascending, instead of shuffled; later steps keep the shuffled order. Needs curriculum_scores."""
    curriculum_scores: PathSetting = ""
    """The data_tools.score output dir whose scores order the curriculum."""

    def __post_init__(self) -> None:
        check((self.curriculum == "none") == (not self.curriculum_scores), "curriculum_scores",
              self.curriculum_scores, f"a scores dir with curriculum={self.curriculum}" if self.curriculum != "none"
              else '"" with curriculum=none')


@dataclass
class HandoverConfig:
    """Auto handover (beyond the paper): end the KD phase once the student beats the teacher."""

    every: int = 0
    """Every N steps compare the student's and the teacher's loss on a fixed validation batch; the KD phase ends
    once the student is better. 0 = off."""
    teacher: PathSetting = ""
    """The SLM to compare with when the soft labels come from a cache (source.kind=cache); with kind=teacher it
    is source.teachers' one teacher ("" here)."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", self.every, ">= 0 (0 = off)")
        if not self.every:
            check_no_effect(self, ["teacher"], "with every=0")


@dataclass
class AlignConfig:
    """Representation alignment (LET, arXiv 2602.05393; beyond SALT): an early student block's output pulled
    toward the SLM's last hidden state through a learned projection, with its own weight decaying to 0. The SLM
    must run online: a cache stores no hidden states."""

    weight: float = 0.0
    """The alignment term's weight at step 0 (LET: about 0.1); 0 = off."""
    layer: int = 1
    """The student block (1-based) whose output is aligned: an early one."""
    kind: Literal["cosine", "mse"] = "cosine"
    """1 - cosine (direction), or squared error relative to the SLM states' mean square (magnitude too)."""
    fraction: float = 0.2
    """The weight decays linearly from `weight` to 0 over this fraction of train.max_steps."""

    def __post_init__(self) -> None:
        check(self.weight >= 0, "weight", self.weight, ">= 0 (0 = off)")
        check(self.layer >= 1, "layer", self.layer, ">= 1 (a student block, 1-based)")
        check(0 < self.fraction <= 1, "fraction", self.fraction, "in (0, 1]")
        if not self.weight:
            check_no_effect(self, ["layer", "kind", "fraction"], "with weight=0")

    def weight_at(self, step: int, total_steps: int) -> float:
        n = max(1, round(self.fraction * total_steps))
        return self.weight * max(0.0, 1 - step / n)


@dataclass
class DistillConfig:
    """SALT's KD term, in sections: where the soft targets come from, how the divergence is computed, which
    tokens get it, which sequences the KD phase draws, its weight over the run, and an automatic end to it."""

    source: SourceConfig = field(default_factory=SourceConfig)
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: KDDataConfig = field(default_factory=KDDataConfig)
    schedule: KDScheduleConfig = field(default_factory=KDScheduleConfig)
    handover: HandoverConfig = field(default_factory=HandoverConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    MOVED = {"teacher": "distill.source.teachers (with distill.source.kind=teacher)",
             "ensemble_teachers": "distill.source.teachers (every teacher in one list)",
             "cache": "distill.source.caches (with distill.source.kind=cache)",
             "ensemble_caches": "distill.source.caches (every cache in one list)",
             "ensemble_combine": "distill.source.combine", "label_smoothing":
             "distill.source.epsilon (with distill.source.kind=label_smoothing)",
             "kind": "distill.loss.kind", "tau": "distill.loss.tau", "beta": "distill.loss.beta",
             "gamma": "distill.loss.gamma", "chunk_tokens": "distill.loss.chunk_tokens",
             "fused_linear": "distill.loss.fused_linear", "gate_topk": "distill.gate.topk",
             "gate_confidence": "distill.gate.confidence", "selection": "distill.data.selection",
             "curriculum": "distill.data.curriculum", "curriculum_scores": "distill.data.curriculum_scores",
             "handover_every": "distill.handover.every"}
    """Settings of the flat distill section before it had sections (a clear error names the new key)."""

    def __post_init__(self) -> None:
        src = self.source
        if src.kind == "none":
            check_no_effect(self, ["loss", "gate", "data", "schedule", "handover", "align"], "with source.kind=none (the "
                            "run is plain CE); set source.kind (teacher, cache or label_smoothing) or remove them")
            return
        if src.kind == "cache":
            check(self.loss.kind == "forward_kl" and self.loss.tau == 1.0, "loss.kind/tau",
                  (self.loss.kind, self.loss.tau), "forward_kl and 1.0 with source.kind=cache (it stores the "
                  "teacher at temperature 1)")
        if src.kind == "label_smoothing":
            check_no_effect(self, ["gate"], "with source.kind=label_smoothing (the control has no teacher to gate on)")
        if self.loss.fused_linear:
            check(src.kind == "teacher" and len(src.teachers) == 1, "loss.fused_linear", True,
                  "false unless the KD term comes from one online teacher (source.kind=teacher, not a cache, an "
                  "ensemble or label smoothing)")
        if self.handover.every:
            check(src.kind in ("teacher", "cache") and (src.kind == "cache") == bool(self.handover.teacher),
                  "handover.teacher", self.handover.teacher, "the SLM to compare with when source.kind=cache, and "
                  '"" with kind=teacher (source.teachers is it)')
            check(len(src.teachers) <= 1, "handover.every", self.handover.every, "0 with a teacher ensemble (the "
                  "handover compares the student with one teacher)")
        if self.align.weight:
            check(src.kind == "teacher" and len(src.teachers) == 1, "align.weight", self.align.weight,
                  "0 unless one SLM runs online (source.kind=teacher with one teacher): a cache stores no hidden "
                  "states, and an ensemble has no one representation")
            check(not self.loss.fused_linear, "align.weight", self.align.weight, "0 with loss.fused_linear")
        if self.data.curriculum != "none":
            sched = self.schedule
            check(sched.kind != "constant" and sched.n_kd_steps != 0 and sched.n_kd_fraction > 0, "data.curriculum",
                  self.data.curriculum, "none with a constant schedule or an empty KD phase (the curriculum orders "
                  "the KD phase's sequences)")
            check(not self.handover.every, "data.curriculum", self.data.curriculum, "none with handover.every (a KD "
                  "phase ended early would leave the hardest sequences first in the CE phase)")

    @property
    def enabled(self) -> bool:
        return self.source.kind != "none"

    @property
    def teacher(self) -> str:
        """The one online SLM the run loads besides a cache (the auto handover's), or a teacher source's first."""
        return self.handover.teacher or (self.source.teachers[0] if self.source.kind == "teacher" else "")


class SALTObjective(Objective):
    """Loss for one micro-batch at step t; metrics: ce, kd (when w_t > 0), w_t, kd_phase, gate_frac, and align /
    align_w while the representation alignment lasts. `teacher` (an online SLM) is needed for the auto handover's
    loss comparison; `student_shape` (hidden size, blocks) for the alignment's projection and layer check."""

    def __init__(self, cfg: DistillConfig, source: SoftTargetSource, vocab: int, total_steps: int,
                 teacher: torch.nn.Module | None = None, probe_batch: torch.Tensor | None = None,
                 z_loss: float = 0.0, student_shape: tuple[int, int] | None = None) -> None:
        self.cfg, self.source, self.vocab, self.total_steps, self.teacher = cfg, source, vocab, total_steps, teacher
        self.z_loss = z_loss
        self.proj: Projections | None = None
        if cfg.align.weight:
            width, blocks = student_shape
            if cfg.align.layer > blocks:
                raise UserError(f"distill.align.layer={cfg.align.layer}: the student has {blocks} blocks")
            self.proj = Projections([(cfg.align.layer, 0)], width, teacher.config.hidden_size)
        if cfg.handover.every and probe_batch is None:
            raise UserError("distill.handover.every needs a validation split (a fixed batch to compare losses on)")
        self.probe = probe_batch
        self.handover_step: int | None = None
        self._checked_step = -1
        self._step = -1  # the latest step this objective ran

    def wants_soft_targets(self) -> bool:
        """Whether the steps from the latest one on may still use the KD term (read from a batch stream's
        prefetch thread: a wrong guess only costs a wasted read or a read at the step, never a wrong loss)."""
        return self.weight(max(self._step, 0)) > 0

    def attach(self, batch: Batch) -> Batch:
        """The source's host-side data (cached labels) read with the batch, while the KD phase lasts."""
        return self.source.attach(batch) if self.wants_soft_targets() else batch

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.proj] if self.proj is not None and not self.proj.identity else []

    def align_weight(self, step: int) -> float:
        return self.cfg.align.weight_at(step, self.total_steps) if self.proj is not None else 0.0

    def weight(self, step: int) -> float:
        if self.handover_step is not None and step >= self.handover_step:
            return 0.0
        return kd_weight(step, self.total_steps, self.cfg.schedule)

    @torch.no_grad()
    def _probe_losses(self, model: torch.nn.Module) -> tuple[float, float]:
        device, ce = next(self.teacher.parameters()).device, []
        for m in (model, self.teacher):
            total, count = eval_loss(m, [self.probe], self.vocab, device)
            ce.append(total / count)
        s, t = dist.all_reduce_sum(ce)  # every rank decides the same
        return s, t

    def _maybe_hand_over(self, model: torch.nn.Module, step: int) -> None:
        every = self.cfg.handover.every
        if not every or self.handover_step is not None or step % every or step == self._checked_step:
            return
        self._checked_step = step
        if kd_weight(step, self.total_steps, self.cfg.schedule) == 0.0:
            return
        student, teacher = self._probe_losses(model)
        if student < teacher:
            self.handover_step = step
            if dist.is_main():
                print(f"auto handover at step {step}: student probe loss {student:.4f} < teacher {teacher:.4f}; "
                      "KD phase ends", flush=True)

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.loss_mask is not None:
            raise UserError("the SALT objective does not take loss masks; distil on packed causal-LM data")
        self._maybe_hand_over(model, step)
        self._step = step
        w = self.weight(step)
        targets = batch.targets()
        metrics = {"w_t": torch.tensor(w, dtype=torch.float64), "kd_phase": torch.tensor(float(w > 0))}
        if self.handover_step is not None:
            metrics["handover_step"] = torch.tensor(float(self.handover_step))
        if self.cfg.loss.fused_linear and w > 0:
            return self._fused_linear(model, batch, targets, w, metrics)
        a = self.align_weight(step)
        out = model(input_ids=batch.input_ids, output_hidden_states=a > 0)
        # Only the real vocabulary is compared and scored: padded rows of either model are cut off.
        logits = out.logits[:, :-1, : self.vocab]
        soft = self.source(batch, self.vocab, hidden=True) if a > 0 else \
            self.source(batch, self.vocab) if w > 0 else None
        if w == 0.0:
            loss, parts = ce_with_z_loss(logits, targets, self.z_loss)
        else:
            loss_cfg = self.cfg.loss
            chunk = chunk_tokens(loss_cfg.chunk_tokens, self.vocab, logits.is_cuda)
            loss, parts = mixed_ce_kd(logits, targets, w, soft, **loss_cfg.terms(), chunk=chunk, z_loss=self.z_loss)
        if a > 0:  # the early block's states, projected, against the SLM's last ones at every position
            layer = self.cfg.align.layer
            h = hidden_loss(self.proj(layer, out.hidden_states[layer]), soft.hidden, self.cfg.align.kind)
            loss = loss + a * h
            parts = {**parts, "align": h.detach(), "align_w": torch.tensor(a, dtype=torch.float64)}
        return loss, {**metrics, **parts}

    def _fused_linear(self, model: torch.nn.Module, batch: Batch, targets: torch.Tensor, w: float,
                      metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The KD-phase loss from hidden states (distill.loss.fused_linear): the output heads run a chunk at a time
        inside the loss. The trunk is called directly, past the DeepSpeed engine's forward (ZeRO 0-2 only)."""
        student = getattr(model, "module", model)
        (s_dec, s_head), (t_dec, t_head) = self._splits(student)
        cfg = self.cfg
        hidden = s_dec(input_ids=batch.input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            t_hidden = t_dec(input_ids=batch.input_ids).last_hidden_state[:, :-1]
        loss, parts = fused_linear_ce_kd(
            hidden, s_head.weight, t_hidden, t_head.weight[: self.vocab], targets, w, **cfg.loss.terms(),
            chunk=chunk_tokens(cfg.loss.chunk_tokens, self.vocab, hidden.is_cuda),
            gate_topk=cfg.gate.topk, gate_confidence=cfg.gate.confidence, z_loss=self.z_loss)
        return loss, {**metrics, **parts}

    def _splits(self, student: torch.nn.Module):
        splits = (decoder_and_head(student), decoder_and_head(self.teacher))
        if None in splits:
            raise UserError("distill.loss.fused_linear needs models whose logits are exactly their output head applied "
                            "to the last hidden state (no logit soft-capping or scaling); set it to false")
        return splits

    def stream(self, step: int) -> str:
        """The KD phase draws from the selected subset (the recipe's "kd" stream) when there is one."""
        return "kd" if self.cfg.data.selection and self.weight(step) > 0 else "main"

    def state_dict(self) -> dict[str, Any]:
        return {"handover_step": self.handover_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handover_step = state.get("handover_step")
