"""Build any HF causal LM from a YAML section, or load a `save_pretrained` directory; choose attention explicitly.

The model stays a plain `nn.Module` (an HF `PreTrainedModel`); DeepSpeed wrapping happens in `engine.py` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from slm_assist.core.config import PathSetting, check
from slm_assist.core.errors import UserError
from slm_assist.core.model_dir import ModelDir, resolve_attn_implementation


@dataclass
class ModelConfig:
    pretrained: PathSetting = ""
    """A local `save_pretrained` directory to start from ("" = build from the fields below, random init)."""
    model_type: str = "llama"
    """Any transformers model type with a causal-LM head (llama, qwen2, mistral, gpt2, ...)."""
    vocab_size: int = -1
    """-1 = the tokenizer's vocabulary size, rounded up to `pad_vocab_to`."""
    pad_vocab_to: int = 64
    """Round the embedding size up to a multiple of this (tensor-core friendly); 1 = no padding."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = -1
    """Grouped-query attention; -1 = num_heads (plain multi-head)."""
    ffn_size: int = 688
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    hf_overrides: dict = field(default_factory=dict)
    """Extra attributes passed to the HF config as is (e.g. rope_theta, rms_norm_eps)."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto = flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""

    def __post_init__(self) -> None:
        check(self.vocab_size == -1 or self.vocab_size > 0, "vocab_size", self.vocab_size, "-1 or > 0")
        check(self.pad_vocab_to >= 1, "pad_vocab_to", self.pad_vocab_to, ">= 1")
        for name in ("hidden_size", "num_layers", "num_heads", "ffn_size", "max_position_embeddings"):
            check(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"a multiple of num_heads={self.num_heads}")
        kv = self.num_kv_heads
        check(kv == -1 or (kv > 0 and self.num_heads % kv == 0), "num_kv_heads", kv,
              f"-1 or a divisor of num_heads={self.num_heads}")


def padded_vocab_size(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def build_hf_config(cfg: ModelConfig, tokenizer_vocab: int, special_ids: dict[str, int | None]):
    from transformers import AutoConfig

    vocab = cfg.vocab_size if cfg.vocab_size > 0 else padded_vocab_size(tokenizer_vocab, cfg.pad_vocab_to)
    if vocab < tokenizer_vocab:
        raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads if cfg.num_kv_heads > 0 else cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )
    kwargs.update(cfg.hf_overrides)
    try:
        return AutoConfig.for_model(cfg.model_type, **kwargs)
    except ValueError as e:
        raise UserError(f"model.model_type={cfg.model_type!r}: {e}") from None


def build_model(cfg: ModelConfig, tokenizer, device: torch.device, dtype: torch.dtype = torch.float32):
    """Random-init model from the config, or a pretrained directory. Parameters live in `dtype` on `device`."""
    from transformers import AutoModelForCausalLM

    if cfg.pretrained:
        return ModelDir.open(cfg.pretrained, "model.pretrained").load(device, len(tokenizer), dtype,
                                                                      cfg.attn_implementation)
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    specials = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    hf_cfg = build_hf_config(cfg, len(tokenizer), specials)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    return model.to(device)


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder block in place (the fast trainers' way: a whole-model trace would include HF's
    attention-mask code, which turns off the flash path); returns how many. The KV cache is turned off first:
    its per-layer update makes dynamo recompile every layer until it falls back to eager. State-dict keys are
    unchanged, so checkpoints and exports are the same as without."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder-layer list at .model.layers to compile")
    model.config.use_cache = False
    for layer in layers:
        layer.compile()
    return len(layers)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token in the PaLM / Megatron convention that MFU is reported in (no recomputation):
    6·N for the matmuls of the N parameters outside the input embedding (the LM head counts, tied or not) plus
    12·L·d·S for attention scores and values over a context of S tokens."""
    cfg = model.config
    n = count_params(model)
    if not getattr(cfg, "tie_word_embeddings", False):
        n -= model.get_input_embeddings().weight.numel()
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
