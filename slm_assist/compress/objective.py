"""The objective of one compression stage: a weighted sum of hard-label CE, soft-label KD from the stage's
teacher, and the latent terms (hidden states through learned projections, attention distributions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from slm_assist.compress.latent import attention_kl, layer_map
from slm_assist.core.config import check, check_no_effect
from slm_assist.core.errors import UserError
from slm_assist.kd.latent import Projections, hidden_loss
from slm_assist.kd.losses import KDLossConfig, SoftTargets, chunk_tokens, kd_loss, mixed_ce_kd
from slm_assist.training.batches import Batch
from slm_assist.training.objective import Objective, ce_with_z_loss

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class LossConfig(KDLossConfig):
    """A stage's loss: the weights of its terms, the KD term's settings (the section SALT's distill.loss shares),
    and the latent terms'."""

    ce: float = 0.0
    """Weight of next-token cross-entropy on the data (hard labels)."""
    kd: float = 0.0
    """Weight of soft-label KD from the stage's teacher (its logits), computed as `kind`, `tau`... say."""
    hidden: float = 0.0
    """Weight of the hidden-state loss over the mapped layers (through a learned projection when widths differ)."""
    hidden_kind: Literal["cosine", "mse"] = "cosine"
    """1 - cosine (direction), or the squared error relative to the teacher states' mean square (magnitude too)."""
    attention: float = 0.0
    """Weight of KL(teacher ‖ student) between mapped layers' attention distributions (needs eager attention)."""
    layer_map: list[int] = field(default_factory=list)
    """The teacher layer (1-based) each student layer learns from; [] = uniform (the last maps to the last)."""
    map_embeddings: bool = False
    """Also match the embedding outputs (layer 0), with the hidden-state loss."""
    scale_latent: bool = False
    """Minitron: rescale the latent term at every step to the magnitude of the logit terms (CE + KD)."""
    last_layer: Literal["state", "logits"] = "state"
    """How the hidden-state loss matches the student's last block. state: like every mapped layer. logits: in
    logit space, since in a causal LM the output head is the task head: the student's final (normed) state,
    projected, is read out through the frozen teacher's output head and matched to the teacher's logits by the KD
    divergence (`kind`, `tau`: the KD term's settings); the hidden-state loss then covers the other mapped layers."""
    projection_init: Literal["kept", "random"] = "kept"
    """kept: a pruned student's projections start as its pruning's channel selection (each student channel to
    the teacher channel it was kept from); random for students that were not pruned, or when asked."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ce", "kd", "hidden", "attention"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.ce + self.kd + self.hidden + self.attention > 0, "ce/kd/hidden/attention",
              (self.ce, self.kd, self.hidden, self.attention), "at least one weight > 0")
        check_no_effect(self, ["fused_linear"], "in a compress stage (its KD term reads the teacher's logits)")
        head = bool(self.hidden) and self.last_layer == "logits"
        if not (self.kd or head):
            check_no_effect(self, ["kind", "tau", "beta", "gamma"], "with kd=0 (and no last_layer=logits)")
        if not (self.ce or self.kd or head):
            check_no_effect(self, ["chunk_tokens"], "without a ce, kd or logit-space term")
        if not (self.hidden or self.attention):
            check_no_effect(self, ["layer_map", "map_embeddings", "scale_latent"], "without a latent loss")
        if not self.hidden:
            check_no_effect(self, ["hidden_kind", "map_embeddings", "last_layer", "projection_init"], "with hidden=0")
        if self.scale_latent:
            check(bool(self.ce or self.kd), "scale_latent", self.scale_latent, "false without a ce or kd term")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kd or self.hidden or self.attention)


class CompressObjective(Objective):
    """Loss for one micro-batch; metrics: loss parts (`ce`, `kd`, `hidden`, `head` (the last block in logit
    space), `attention`) and `latent_scale`. `teacher` is frozen; the projections are trainable heads (trained and
    checkpointed, never exported). `kept_channels`: the teacher channel each student channel was pruned from."""

    def __init__(self, cfg: LossConfig, teacher: torch.nn.Module | None, student_config: PretrainedConfig,
                 vocab: int, field: str = "loss", default_map: list[int] | None = None,
                 head_map: list[list[int]] | None = None, z_loss: float = 0.0,
                 kept_channels: list[int] | None = None) -> None:
        if cfg.needs_teacher and teacher is None:
            raise UserError(f"{field}: kd/hidden/attention need a teacher for this stage")
        self.cfg, self.teacher, self.vocab, self.field, self.z_loss = cfg, teacher, vocab, field, z_loss
        self.attn_implementation = "eager" if cfg.attention else None
        self.pairs: list[tuple[int, int]] = []
        self.proj: Projections | None = None
        if cfg.hidden or cfg.attention:
            t_cfg = teacher.config
            self.pairs = layer_map(student_config.num_hidden_layers, t_cfg.num_hidden_layers,
                                   cfg.layer_map or default_map, cfg.map_embeddings, f"{field}.layer_map")
        self.n_student = student_config.num_hidden_layers
        if cfg.hidden:
            kept = kept_channels if cfg.projection_init == "kept" else None
            self.proj = Projections(self.pairs, student_config.hidden_size, teacher.config.hidden_size,
                                    kept if kept is not None and len(kept) == student_config.hidden_size else None)
        self.head = cfg.hidden and cfg.last_layer == "logits"
        # per student block, the teacher heads its heads came from (a pruned student); used with the default map
        self.head_map = head_map if head_map and not cfg.layer_map else None

    def _teacher_heads(self, attn: torch.Tensor, student_block: int) -> torch.Tensor:
        return attn if self.head_map is None else attn[:, self.head_map[student_block - 1]]

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.proj] if self.proj is not None and not self.proj.identity else []

    def __call__(self, model: torch.nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.loss_mask is not None:
            raise UserError("compression stages train on packed causal-LM data; loss masks are not supported")
        cfg = self.cfg
        want = {"output_hidden_states": bool(cfg.hidden), "output_attentions": bool(cfg.attention)}
        # logits nobody reads are not computed: [B, T, V] is the biggest activation of a small model
        out = model(input_ids=batch.input_ids, **want, **({} if cfg.ce or cfg.kd else {"logits_to_keep": 1}))
        t_out = None
        if self.teacher is not None and cfg.needs_teacher:
            with torch.no_grad():
                t_out = self.teacher(input_ids=batch.input_ids, **want,
                                     **({} if cfg.kd or self.head else {"logits_to_keep": 1}))
        logits, targets = out.logits[:, :-1, : self.vocab], batch.targets()
        metrics: dict[str, torch.Tensor] = {}
        logit_loss = torch.zeros((), device=batch.input_ids.device)
        if cfg.kd:
            soft = SoftTargets(logits=t_out.logits[:, :-1, : self.vocab])
            # z-loss scaled so that it stays z·log²Z after the (kd + ce) factor below
            mixed, parts = mixed_ce_kd(logits, targets, cfg.kd / (cfg.kd + cfg.ce), soft, **cfg.terms(),
                                       chunk=chunk_tokens(cfg.chunk_tokens, self.vocab, logits.is_cuda),
                                       z_loss=self.z_loss / (cfg.kd + cfg.ce))
            logit_loss = (cfg.kd + cfg.ce) * mixed  # = ce·CE + kd·KD (+ z·log²Z)
            metrics.update({k: v for k, v in parts.items() if k in ("ce", "kd", "z")})
        elif cfg.ce:
            ce, parts = ce_with_z_loss(logits, targets, self.z_loss / cfg.ce)
            logit_loss = cfg.ce * ce
            metrics.update(parts)
        latent = torch.zeros((), device=batch.input_ids.device)
        if cfg.hidden:
            pairs = [(s, t) for s, t in self.pairs if not (self.head and s == self.n_student)]
            if pairs:
                h = torch.stack([hidden_loss(self.proj(s, out.hidden_states[s]), t_out.hidden_states[t],
                                             cfg.hidden_kind) for s, t in pairs]).mean()
                latent = latent + cfg.hidden * h
                metrics["hidden"] = h.detach()
            if self.head:
                head = self._head_loss(out.hidden_states[-1], t_out.logits, targets)
                latent = latent + cfg.hidden * head
                metrics["head"] = head.detach()
        if cfg.attention:
            blocks = [(s, t) for s, t in self.pairs if s > 0]  # attentions exist for blocks, not embeddings
            a = torch.stack([attention_kl(out.attentions[s - 1], self._teacher_heads(t_out.attentions[t - 1], s),
                                          f"{self.field}.attention") for s, t in blocks])
            latent = latent + cfg.attention * a.mean()
            metrics["attention"] = a.mean().detach()
        if cfg.scale_latent and latent.requires_grad:
            scale = (logit_loss.detach() / latent.detach().clamp_min(1e-12))
            latent = latent * scale
            metrics["latent_scale"] = scale
        return logit_loss + latent, metrics

    def _head_loss(self, final: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The student's last block in logit space: its final state (HF's last hidden state is after the final
        norm), projected to the teacher's width and read out through the frozen teacher's head, against the
        teacher's logits. Through a pruned student's kept-channel projection this starts equal to the KD term."""
        head = self.teacher.get_output_embeddings()
        z = head(self.proj(self.n_student, final[:, :-1]).to(head.weight.dtype))[..., : self.vocab]
        return kd_loss(z, teacher_logits[:, :-1, : self.vocab], **self.cfg.terms(), targets=targets,
                       chunk=chunk_tokens(self.cfg.chunk_tokens, self.vocab, z.is_cuda))
