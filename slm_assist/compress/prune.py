"""Minitron-style structured pruning (arXiv 2407.14679) of a Llama-family teacher into the student shape.

Importance comes from activations on calibration sequences (no gradients):
- hidden channels: mean |output| of every RMSNorm (the two per block and the final one), summed;
- attention heads: mean L2 norm of each head's output (the input of o_proj), per KV group under GQA;
- MLP neurons: mean |input of down_proj|;
- blocks: 1 - cos(block input, block output), mean over tokens (a block that barely changes its input goes first).
The most important channels / heads / neurons / blocks are kept in their original order and every weight, norm
and the (tied) embedding is sliced to them: keeping everything reproduces the teacher exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slm_assist.core.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass
class Importance:
    channels: torch.Tensor  # [d]
    heads: list[torch.Tensor]  # per block: [kv groups]
    neurons: list[torch.Tensor]  # per block: [ffn]
    blocks: torch.Tensor  # [L]


def _check_supported(model: torch.nn.Module) -> None:
    if model.config.model_type not in _SUPPORTED:
        raise UserError(f"init.kind=prune: supports {', '.join(_SUPPORTED)} models; the teacher is "
                        f"{model.config.model_type} (use init.kind=layers or random)")


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def importance(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> Importance:
    """Activation importance of every prunable unit, averaged over the calibration batches' tokens."""
    _check_supported(model)
    cfg, layers = model.config, model.model.layers
    hd, groups = _head_dim(cfg), cfg.num_key_value_heads
    per_group = cfg.num_attention_heads // groups
    L, d = len(layers), cfg.hidden_size
    acc = {"channels": torch.zeros(d), "heads": torch.zeros(L, groups), "neurons": torch.zeros(L, cfg.intermediate_size),
           "blocks": torch.zeros(L)}
    tokens = 0
    hooks, block_in = [], {}

    def norm_hook(_m, _args, out):
        acc["channels"].add_(out.detach().float().abs().sum((0, 1)).cpu())

    for norm in [model.model.norm] + [n for b in layers for n in (b.input_layernorm, b.post_attention_layernorm)]:
        hooks.append(norm.register_forward_hook(norm_hook))
    for i, block in enumerate(layers):
        def heads_hook(_m, args, i=i):
            x = args[0].detach().float().unflatten(-1, (groups, per_group * hd))
            acc["heads"][i].add_(x.norm(dim=-1).sum((0, 1)).cpu())

        def neurons_hook(_m, args, i=i):
            acc["neurons"][i].add_(args[0].detach().float().abs().sum((0, 1)).cpu())

        def block_pre(_m, args, kwargs, i=i):
            block_in[i] = (args[0] if args else kwargs["hidden_states"]).detach().float()

        def block_post(_m, _args, _kwargs, out, i=i):
            y = (out[0] if isinstance(out, tuple) else out).detach().float()
            acc["blocks"][i].add_((1 - torch.nn.functional.cosine_similarity(block_in.pop(i), y, dim=-1)).sum().cpu())

        hooks += [block.self_attn.o_proj.register_forward_pre_hook(heads_hook),
                  block.mlp.down_proj.register_forward_pre_hook(neurons_hook),
                  block.register_forward_pre_hook(block_pre, with_kwargs=True),
                  block.register_forward_hook(block_post, with_kwargs=True)]
    try:
        for ids in batches:
            model(input_ids=ids.to(next(model.parameters()).device))
            tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise UserError("init.kind=prune: no calibration sequences")
    return Importance(acc["channels"] / tokens, list(acc["heads"] / tokens), list(acc["neurons"] / tokens),
                      acc["blocks"] / tokens)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (so keeping all is the identity)."""
    return scores.topk(k).indices.sort().values


def check_prune_targets(cfg: PretrainedConfig, *, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                        axes: str = "both") -> None:
    """The target shape fits inside the source's config `cfg`, in whole GQA groups, and changes only `axes`
    (width, depth or both)."""
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    want = {"model.hidden_size": (hidden, cfg.hidden_size), "model.num_layers": (layers, cfg.num_hidden_layers),
            "model.num_heads": (heads, cfg.num_attention_heads), "model.num_kv_heads": (kv_heads, cfg.num_key_value_heads),
            "model.ffn_size": (ffn, cfg.intermediate_size)}
    for name, (target, have) in want.items():
        if not 0 < target <= have:
            raise UserError(f"init.kind=prune: {name}={target} must be in 1..{have} (the teacher's); pruning only "
                            "removes units")
    fixed = {"width": ["model.num_layers"], "depth": [n for n in want if n != "model.num_layers"]}.get(axes, [])
    for name in fixed:
        target, have = want[name]
        if target != have:
            kind = "depth" if axes == "width" else "width"
            raise UserError(f"init.axes={axes}: {name}={target} changes the {kind} (the source has {have}); set "
                            f"{name}={have}, or init.axes=both")
    if heads != kv_heads * per_group:
        raise UserError(f"init.kind=prune: model.num_heads={heads} must be model.num_kv_heads={kv_heads} x the "
                        f"teacher's {per_group} query heads per KV head (whole GQA groups are pruned)")


@dataclass
class Pruned:
    """A pruned model and where its parts came from: what the latent losses map the student to."""

    model: torch.nn.Module
    blocks: list[int]
    """The teacher blocks it kept (1-based), in order."""
    heads: list[list[int]]
    """Per kept block, the teacher's query heads in the student's head order."""
    channels: list[int]
    """The teacher's hidden channel each student channel is (0-based)."""


def prune(model: torch.nn.Module, imp: Importance, *, hidden: int, layers: int, heads: int, kv_heads: int,
          ffn: int) -> Pruned:
    """A new model of the teacher's architecture and the target shape, with the teacher's kept weights."""
    from transformers import AutoModelForCausalLM

    _check_supported(model)
    cfg = model.config
    check_prune_targets(cfg, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, ffn=ffn)
    hd, per_group = _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    keep_d = _top(imp.channels, hidden)
    keep_blocks = _top(imp.blocks, layers)
    new_cfg = cfg.__class__.from_dict(cfg.to_dict())
    new_cfg.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "intermediate_size": ffn, "head_dim": hd})
    if getattr(new_cfg, "layer_types", None) is not None:
        new_cfg.layer_types = [cfg.layer_types[i] for i in keep_blocks.tolist()]
    student = AutoModelForCausalLM.from_config(new_cfg, dtype=model.dtype,
                                               attn_implementation=cfg._attn_implementation)
    src, dst, kept_heads = model.state_dict(), {}, []
    dst["model.embed_tokens.weight"] = src["model.embed_tokens.weight"][:, keep_d]
    dst["model.norm.weight"] = src["model.norm.weight"][keep_d]
    if "lm_head.weight" in src and not cfg.tie_word_embeddings:
        dst["lm_head.weight"] = src["lm_head.weight"][:, keep_d]
    for new, old in enumerate(keep_blocks.tolist()):
        p, q = f"model.layers.{old}.", f"model.layers.{new}."
        groups = _top(imp.heads[old], kv_heads)
        kept_heads.append((groups[:, None] * per_group + torch.arange(per_group)).reshape(-1).tolist())
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).reshape(-1)
        q_rows = (groups[:, None] * per_group * hd + torch.arange(per_group * hd)).reshape(-1)
        neurons = _top(imp.neurons[old], ffn)
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                "mlp.gate_proj": neurons, "mlp.up_proj": neurons}
        for name, r in rows.items():
            dst[q + name + ".weight"] = src[p + name + ".weight"][r][:, keep_d]
            if p + name + ".bias" in src:  # qwen2's q/k/v biases
                dst[q + name + ".bias"] = src[p + name + ".bias"][r]
        dst[q + "self_attn.o_proj.weight"] = src[p + "self_attn.o_proj.weight"][keep_d][:, q_rows]
        dst[q + "mlp.down_proj.weight"] = src[p + "mlp.down_proj.weight"][keep_d][:, neurons]
        for name in ("self_attn.o_proj", "mlp.down_proj"):  # llama with attention_bias / mlp_bias
            if p + name + ".bias" in src:
                dst[q + name + ".bias"] = src[p + name + ".bias"][keep_d]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            dst[q + norm + ".weight"] = src[p + norm + ".weight"][keep_d]
    missing, unexpected = student.load_state_dict({k: v.clone() for k, v in dst.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"init.kind=prune: cannot slice this {cfg.model_type} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    return Pruned(student, [b + 1 for b in keep_blocks.tolist()], kept_heads, keep_d.tolist())
