"""SALT's objective: (1 - w_t)·CE + w_t·KD(student, soft targets; tau) = the KD-weight schedule x a soft-target
source (online SLM, its cached labels, or the smoothed one-hot control) x the fused CE+KD loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slm_assist.core import dist
from slm_assist.core.config import PathSetting, check, check_no_effect
from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import decoder_and_head
from slm_assist.kd.fused_linear import fused_linear_ce_kd
from slm_assist.kd.losses import chunk_tokens, mixed_ce_kd
from slm_assist.kd.schedule import KDScheduleConfig, kd_weight
from slm_assist.kd.sources import SoftTargetSource
from slm_assist.training.batches import Batch
from slm_assist.training.objective import Objective, ce_with_z_loss


@dataclass
class DistillConfig:
    teacher: PathSetting = ""
    """The SLM teacher: a save_pretrained directory with its tokenizer ("" = no distillation, plain CE)."""
    kind: Literal["forward_kl", "reverse_kl", "jsd", "nkd"] = "forward_kl"
    tau: float = 1.0
    """Softmax temperature of the KD term."""
    beta: float = 0.5
    """jsd only."""
    gamma: float = 1.5
    """nkd only: weight of the non-target term."""
    chunk_tokens: int = -1
    """Tokens per chunk of the fused CE+KD loss, which bounds its fp32 [chunk, vocab] temporaries. -1 = auto:
    16 MiB per temporary on CPU (131 tokens at vocab 32k; measured 0.83x the CE-only loss peak at seq 2048,
    against 1.55x at 1024-token chunks, bench/kd_overhead.py), 64 MiB on a GPU. 0 = unchunked."""
    gate_topk: int = 0
    """Token gating (beyond the paper): KD only on tokens whose target is in the teacher's top-k, CE on the
    rest, since SLM soft labels add bias where the SLM is wrong. 0 = off."""
    gate_confidence: float = 0.0
    """Confidence gating (beyond the paper): KD off on tokens where the SLM is confidently wrong (its top-1 is
    not the target and has probability >= this), CE there instead. 0 = off."""
    ensemble_teachers: list[PathSetting] = field(default_factory=list)
    """Teacher ensemble (MEAL V2): more SLM model dirs whose distributions are combined with distill.teacher's
    into one soft target (ensemble_combine). [] = one teacher."""
    ensemble_caches: list[PathSetting] = field(default_factory=list)
    """The same from the cache: more data_tools.score dirs with top_k caches of other SLMs, combined with
    distill.cache's (their union of top-k ids; each one's tail mass stays in the tail bucket)."""
    ensemble_combine: Literal["mean", "vote"] = "mean"
    """mean: the average of the members' probabilities. vote (committee voting): per token, the average of the
    members whose top-1 token is the majority's (a tie goes to the more confident group)."""
    curriculum: Literal["none", "mean_loss", "salt_ds"] = "none"
    """Easy-to-hard curriculum in the KD phase (Easy2Hard): the sequences the KD phase draws are ordered by this
    SLM score, ascending (easiest first), instead of shuffled; later steps keep the shuffled order. Needs
    distill.curriculum_scores."""
    curriculum_scores: PathSetting = ""
    """The data_tools.score output dir whose scores order the curriculum."""
    fused_linear: bool = False
    """KD-phase loss straight from the hidden states of student and teacher, a chunk of tokens at a time
    (kd/fused_linear.py): neither model's full logits exist, which saves most of the loss memory at a 32k+
    vocabulary. Online teacher only (no cache, no ensemble), ZeRO 0-2, models whose logits are head(hidden)."""
    cache: PathSetting = ""
    """A data_tools.score output dir with a soft-label cache for this data: KD from the cached top-k / sampled
    labels instead of running the teacher (forward KL, tau = 1). "" = online teacher."""
    selection: PathSetting = ""
    """A data_tools.select index.npy: KD-phase batches come from these sequences, later ones from the full
    split ("" = the full split throughout)."""
    handover_every: int = 0
    """Auto handover (beyond the paper): every N steps compare the student's and the teacher's loss on a fixed
    validation batch and end the KD phase once the student is better. 0 = off."""
    label_smoothing: float = 0.0
    """Control arm, no teacher: the soft target is the one-hot smoothed by this epsilon instead of the SLM's
    distribution, under the same w_t schedule (and subset). The gap to SALT is the part owed to the SLM's
    knowledge rather than to regularisation. 0 = off."""
    schedule: KDScheduleConfig = field(default_factory=KDScheduleConfig)

    def __post_init__(self) -> None:
        check(self.tau > 0, "tau", self.tau, "> 0")
        check(0 < self.beta < 1, "beta", self.beta, "in (0, 1)")
        check(self.chunk_tokens >= -1, "chunk_tokens", self.chunk_tokens, "-1 (auto), 0 (unchunked) or > 0")
        check(self.gate_topk >= 0, "gate_topk", self.gate_topk, ">= 0 (0 = off)")
        check(self.handover_every >= 0, "handover_every", self.handover_every, ">= 0 (0 = off)")
        if self.cache:
            check(self.kind == "forward_kl" and self.tau == 1.0, "kind/tau", (self.kind, self.tau),
                  "forward_kl and 1.0 with a soft-label cache (it stores the teacher at temperature 1)")
        if self.handover_every:
            check(bool(self.teacher), "handover_every", self.handover_every, "0 unless distill.teacher is set")
        check(0 <= self.gate_confidence < 1, "gate_confidence", self.gate_confidence, "in [0, 1) (0 = off)")
        if self.ensemble_teachers:
            check(bool(self.teacher) and not self.cache, "ensemble_teachers", self.ensemble_teachers,
                  "[] unless distill.teacher is set and distill.cache is not (an online ensemble needs a first "
                  "teacher; with a cache use ensemble_caches)")
        if self.ensemble_caches:
            check(bool(self.cache), "ensemble_caches", self.ensemble_caches, "[] unless distill.cache is set")
        if not (self.ensemble_teachers or self.ensemble_caches):
            check_no_effect(self, ["ensemble_combine"], "without ensemble_teachers or ensemble_caches")
        check((self.curriculum == "none") == (not self.curriculum_scores), "curriculum_scores",
              self.curriculum_scores, f"a scores dir with curriculum={self.curriculum}" if self.curriculum != "none"
              else '"" with curriculum=none')
        if self.curriculum != "none":
            sched = self.schedule
            check(sched.kind != "constant" and sched.n_kd_steps != 0 and sched.n_kd_fraction > 0, "curriculum",
                  self.curriculum, "none with a constant schedule or an empty KD phase (the curriculum orders the KD "
                  "phase's sequences)")
            check(not self.handover_every, "curriculum", self.curriculum, "none with handover_every (a KD phase "
                  "ended early would leave the hardest sequences first in the CE phase)")
        if self.fused_linear:
            check(bool(self.teacher) and not (self.cache or self.ensemble_teachers or self.label_smoothing),
                  "fused_linear", self.fused_linear, "false unless the KD term comes from one online distill.teacher "
                  "(not a cache, an ensemble or label smoothing)")
        if self.handover_every and self.ensemble_teachers:
            check(False, "handover_every", self.handover_every, "0 with ensemble_teachers (the handover compares "
                  "the student with distill.teacher alone)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        if self.label_smoothing:
            check(not (self.teacher or self.cache or self.gate_topk or self.gate_confidence), "label_smoothing",
                  self.label_smoothing, "0 with distill.teacher / cache / gate_topk / gate_confidence (the control "
                  "replaces the teacher)")
        if self.cache and self.teacher:  # KD reads the cache: the teacher would be loaded for nothing
            check(self.handover_every > 0, "teacher", self.teacher,
                  '"" with distill.cache unless distill.handover_every is set (the cache gives the soft labels; '
                  "the teacher serves only the auto handover)")
        if not self.enabled:
            check_no_effect(self, None, "without distill.teacher, distill.cache or distill.label_smoothing (the "
                                        "run is plain CE); remove it or set one of those")
        check_no_effect(self, [n for n, kind in (("beta", "jsd"), ("gamma", "nkd")) if self.kind != kind],
                        f"with distill.kind={self.kind}")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.cache or self.label_smoothing)


class SALTObjective(Objective):
    """Loss for one micro-batch at step t; metrics: ce, kd (when w_t > 0), w_t, kd_phase, gate_frac.
    `teacher` (an online SLM) is needed only for the auto handover's loss comparison."""

    def __init__(self, cfg: DistillConfig, source: SoftTargetSource, vocab: int, total_steps: int,
                 teacher: torch.nn.Module | None = None, probe_batch: torch.Tensor | None = None) -> None:
        self.cfg, self.source, self.vocab, self.total_steps, self.teacher = cfg, source, vocab, total_steps, teacher
        if cfg.handover_every and probe_batch is None:
            raise UserError("distill.handover_every needs a validation split (a fixed batch to compare losses on)")
        self.probe = probe_batch
        self.handover_step: int | None = None
        self._checked_step = -1
        self._step = -1  # the latest step this objective ran

    def wants_soft_targets(self) -> bool:
        """Whether the steps from the latest one on may still use the KD term (read from a batch stream's
        prefetch thread: a wrong guess only costs a wasted read or a read at the step, never a wrong loss)."""
        return self.weight(max(self._step, 0)) > 0

    def weight(self, step: int) -> float:
        if self.handover_step is not None and step >= self.handover_step:
            return 0.0
        return kd_weight(step, self.total_steps, self.cfg.schedule)

    @torch.no_grad()
    def _probe_losses(self, model: torch.nn.Module) -> tuple[float, float]:
        ids = self.probe.to(next(self.teacher.parameters()).device)
        ce = [F.cross_entropy(m(input_ids=ids).logits[:, :-1, : self.vocab].float().reshape(-1, self.vocab),
                              ids[:, 1:].reshape(-1)).item() for m in (model, self.teacher)]
        s, t = dist.all_reduce_sum(ce)  # every rank decides the same
        return s, t

    def _maybe_hand_over(self, model: torch.nn.Module, step: int) -> None:
        every = self.cfg.handover_every
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
        if self.cfg.fused_linear and w > 0:
            return self._fused_linear(model, batch, targets, w, metrics)
        # Only the real vocabulary is compared and scored: padded rows of either model are cut off.
        logits = model(input_ids=batch.input_ids).logits[:, :-1, : self.vocab]
        if w == 0.0:
            loss, parts = ce_with_z_loss(logits, targets, self.z_loss)
            return loss, {**parts, **metrics}
        cfg = self.cfg
        chunk = chunk_tokens(cfg.chunk_tokens, self.vocab, logits.is_cuda)
        loss, parts = mixed_ce_kd(logits, targets, w, self.source(batch, self.vocab), kind=cfg.kind, tau=cfg.tau,
                                  beta=cfg.beta, gamma=cfg.gamma, chunk=chunk, z_loss=self.z_loss)
        return loss, {**metrics, **parts}

    def _fused_linear(self, model: torch.nn.Module, batch: Batch, targets: torch.Tensor, w: float,
                      metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The KD-phase loss from hidden states (distill.fused_linear): the output heads run a chunk at a time
        inside the loss. The trunk is called directly, past the DeepSpeed engine's forward (ZeRO 0-2 only)."""
        student = getattr(model, "module", model)
        (s_dec, s_head), (t_dec, t_head) = self._splits(student)
        cfg = self.cfg
        hidden = s_dec(input_ids=batch.input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            t_hidden = t_dec(input_ids=batch.input_ids).last_hidden_state[:, :-1]
        loss, parts = fused_linear_ce_kd(
            hidden, s_head.weight, t_hidden, t_head.weight[: self.vocab], targets, w, kind=cfg.kind, tau=cfg.tau,
            beta=cfg.beta, gamma=cfg.gamma, chunk=chunk_tokens(cfg.chunk_tokens, self.vocab, hidden.is_cuda),
            gate_topk=cfg.gate_topk, gate_confidence=cfg.gate_confidence, z_loss=self.z_loss)
        return loss, {**metrics, **parts}

    def _splits(self, student: torch.nn.Module):
        splits = (decoder_and_head(student), decoder_and_head(self.teacher))
        if None in splits:
            raise UserError("distill.fused_linear needs models whose logits are exactly their output head applied "
                            "to the last hidden state (no logit soft-capping or scaling); set it to false")
        return splits

    def stream(self, step: int) -> str:
        """The KD phase draws from the selected subset (the recipe's "kd" stream) when there is one."""
        return "kd" if self.cfg.selection and self.weight(step) > 0 else "main"

    def state_dict(self) -> dict[str, Any]:
        return {"handover_step": self.handover_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handover_step = state.get("handover_step")
