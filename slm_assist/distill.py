"""SALT distillation objective: (1 - w_t)·CE + w_t·KD(student, frozen SLM teacher; tau), with w_t from the
KD-weight schedule. Plugs into the trainer through the `Objective` interface (objectives.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slm_assist.config import check
from slm_assist.errors import UserError
from slm_assist.kd_schedule import KDScheduleConfig, kd_weight
from slm_assist.losses import ce_plus_kd


@dataclass
class DistillConfig:
    teacher: str = ""
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
    16 MiB per temporary (131 tokens at vocab 32k; measured 0.83x the CE-only loss peak at seq 2048, against
    1.55x at 1024-token chunks, bench/kd_overhead.py). 0 = unchunked."""
    gate_topk: int = 0
    """Token gating (beyond the paper): KD only on tokens whose target is in the teacher's top-k, CE on the
    rest, since SLM soft labels add bias where the SLM is wrong. 0 = off."""
    cache: str = ""
    """A data_tools.score output dir with a soft-label cache for this data: KD from the cached top-k / sampled
    labels instead of running the teacher (forward KL, tau = 1). "" = online teacher."""
    selection: str = ""
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
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        if self.label_smoothing:
            check(not (self.teacher or self.cache or self.gate_topk), "label_smoothing", self.label_smoothing,
                  "0 with distill.teacher / cache / gate_topk (the control replaces the teacher)")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher or self.cache or self.label_smoothing)


def load_teacher(path: str, dataset_fingerprint: str, vocab: int, device: torch.device) -> torch.nn.Module:
    """Frozen teacher: eval mode, no grad, its own dtype; the data's tokenizer, and at least `vocab` (the real,
    unpadded vocabulary) output rows. Padded embedding sizes may differ from the student's."""
    from transformers import AutoModelForCausalLM

    from data_tools.tokenizer import load_tokenizer, tokenizer_fingerprint

    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"distill.teacher={path}: not a save_pretrained directory (no config.json)")
    if not (d / "tokenizer_config.json").is_file():
        raise UserError(f"distill.teacher={path}: no tokenizer next to the model; cannot check the vocabulary")
    fp = tokenizer_fingerprint(load_tokenizer(d))
    if fp != dataset_fingerprint:
        raise UserError(f"distill.teacher={path}: tokenizer fingerprint {fp} differs from the data's "
                        f"{dataset_fingerprint}; SALT needs the teacher and the student to share one vocabulary")
    teacher = AutoModelForCausalLM.from_pretrained(str(d)).to(device)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_t < vocab:
        raise UserError(f"distill.teacher={path}: {v_t} output rows < the tokenizer's {vocab} tokens")
    teacher.eval().requires_grad_(False)
    return teacher


def load_cache(scores_dir: str, data_manifest: dict):
    """The soft-label cache of a scoring run over exactly this packed dataset's train split."""
    import json

    from data_tools.pack import dataset_fingerprint
    from data_tools.softlabels import SoftLabelCache

    d = Path(scores_dir)
    if not (d / "manifest.json").is_file() or not (d / "cache").is_dir():
        raise UserError(f"distill.cache={scores_dir}: no finished data_tools.score output with a cache/ "
                        "(score with cache.mode=top_k or sampled)")
    m = json.loads((d / "manifest.json").read_text())
    if m.get("dataset_fingerprint") != dataset_fingerprint(data_manifest) or m.get("split") != "train":
        raise UserError(f"distill.cache={scores_dir}: cached for dataset {m.get('dataset_fingerprint')} split "
                        f"{m.get('split')!r}, but this run trains on {dataset_fingerprint(data_manifest)} 'train'")
    return SoftLabelCache(d / "cache")


class SALTObjective:
    """Loss for one micro-batch at step t; metrics: ce, kd (when w_t > 0), w_t, kd_phase, gate_frac."""

    def __init__(self, cfg: DistillConfig, teacher: torch.nn.Module | None, vocab: int, total_steps: int,
                 probe_batch: torch.Tensor | None = None, cache=None) -> None:
        self.cfg, self.teacher, self.vocab, self.total_steps, self.cache = cfg, teacher, vocab, total_steps, cache
        self.chunk = cfg.chunk_tokens if cfg.chunk_tokens >= 0 else max(1, (16 << 20) // (4 * vocab))
        if cache is not None and cfg.gate_topk and (cache.mode != "top_k" or cfg.gate_topk > cache.shape[1]):
            raise UserError(f"distill.gate_topk={cfg.gate_topk} needs a top_k cache with k >= {cfg.gate_topk} "
                            f"(this one: {cache.mode}, width {cache.shape[1]})")
        if cfg.handover_every and probe_batch is None:
            raise UserError("distill.handover_every needs a validation split (a fixed batch to compare losses on)")
        self.probe = probe_batch
        self.handover_step: int | None = None
        self._checked_step = -1

    def weight(self, step: int) -> float:
        if self.handover_step is not None and step >= self.handover_step:
            return 0.0
        return kd_weight(step, self.total_steps, self.cfg.schedule)

    @torch.no_grad()
    def _probe_losses(self, model: torch.nn.Module) -> tuple[float, float]:
        from slm_assist import dist

        ids = self.probe.to(next(self.teacher.parameters()).device)
        ce = [F.cross_entropy(m(input_ids=ids).logits[:, :-1, : self.vocab].float().reshape(-1, self.vocab),
                              ids[:, 1:].reshape(-1)).item() for m in (model, self.teacher)]
        s, t = dist.all_reduce_sum(ce)  # every rank decides the same
        return s, t

    def _maybe_hand_over(self, model: torch.nn.Module, step: int) -> None:
        from slm_assist import dist

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

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, step: int,
                 index=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._maybe_hand_over(model, step)
        w = self.weight(step)
        # Only the real vocabulary is compared and scored: padded rows of either model are cut off.
        logits = model(input_ids=input_ids).logits[:, :-1, : self.vocab]
        targets = input_ids[:, 1:]
        metrics = {"w_t": torch.tensor(w, dtype=torch.float64), "kd_phase": torch.tensor(float(w > 0))}
        if self.handover_step is not None:
            metrics["handover_step"] = torch.tensor(float(self.handover_step))
        if w == 0.0:
            ce = F.cross_entropy(logits.reshape(-1, self.vocab).float(), targets.reshape(-1))
            return ce, {"ce": ce.detach(), **metrics}
        if self.cfg.label_smoothing:
            # (1-w)·CE + w·CE(smoothed one-hot eps) = CE with smoothing w·eps, up to a constant (the target entropy)
            flat, tgt = logits.reshape(-1, self.vocab).float(), targets.reshape(-1)
            loss = F.cross_entropy(flat, tgt, label_smoothing=w * self.cfg.label_smoothing)
            with torch.no_grad():
                ce = F.cross_entropy(flat, tgt)
                kd = F.cross_entropy(flat, tgt, label_smoothing=self.cfg.label_smoothing)
            return loss, {"ce": ce, "kd": kd, **metrics}
        gate = torch.ones(targets.numel(), device=logits.device)
        if self.cache is not None:
            labels = {k: v.to(logits.device) for k, v in self.cache.get(index).items()}
            if self.cfg.gate_topk:  # the cache's ids are sorted by teacher probability
                gate = (labels["ids"][..., : self.cfg.gate_topk] == targets.unsqueeze(-1)).any(-1).reshape(-1).float()
            kd_args = {"cache": labels}
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids).logits[:, :-1, : self.vocab]
                if self.cfg.gate_topk:
                    kth = teacher_logits.topk(self.cfg.gate_topk, dim=-1).values[..., -1]
                    gate = (teacher_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) >= kth).reshape(-1).float()
            kd_args = {"teacher_logits": teacher_logits, "kind": self.cfg.kind, "tau": self.cfg.tau,
                       "beta": self.cfg.beta, "gamma": self.cfg.gamma}
        # per token: (1 - w·g)·CE + w·g·KD, averaged over all tokens, CE and KD fused in one chunked pass
        loss, ce_tok, kd_tok = ce_plus_kd(logits, targets, w * gate, chunk=self.chunk, **kd_args)
        kept = gate.sum()
        metrics.update(ce=ce_tok.mean(), kd=(kd_tok * gate).sum() / kept.clamp_min(1.0), gate_frac=kept / gate.numel())
        return loss, metrics

    def stream(self, step: int) -> str:
        return "kd" if self.weight(step) > 0 else "main"

    def state_dict(self) -> dict[str, Any]:
        return {"handover_step": self.handover_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handover_step = state.get("handover_step")
