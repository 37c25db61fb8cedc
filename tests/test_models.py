from __future__ import annotations

import pytest
import torch

from slm_assist.core.config import load_config
from slm_assist.core.errors import UserError
from slm_assist.training.models import (
    ModelConfig,
    build_model,
    count_params,
    flops_per_token,
    padded_vocab_size,
    resolve_attn_implementation,
)


class Tok:
    """The three things build_model reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 2, 3, 0

    def __len__(self) -> int:
        return 250


def _cfg(*overrides: str) -> ModelConfig:
    return load_config(ModelConfig, None, ["hidden_size=32", "num_layers=2", "num_heads=4", "ffn_size=64", *overrides])


def test_llama_default_shapes_and_param_count():
    model = build_model(_cfg(), Tok(), torch.device("cpu"))
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().num_embeddings == padded_vocab_size(250, 64) == 256
    # embeddings (tied) + per layer: q,k,v,o (4·32·32) + gate,up,down (3·32·64) + 2 norms, + final norm
    assert count_params(model) == 256 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert model.config.eos_token_id == 3 and model.config._attn_implementation == "sdpa"


def test_flops_per_token_by_hand():
    """6·N (N without the input embedding; a tied LM head still counts) + 12·L·d·S."""
    layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    tied = build_model(_cfg(), Tok(), torch.device("cpu"))
    assert flops_per_token(tied, 128) == 6 * (256 * 32 + 2 * layer + 32) + 12 * 2 * 32 * 128
    untied = build_model(_cfg("tie_word_embeddings=false"), Tok(), torch.device("cpu"))
    assert flops_per_token(untied, 128) == 6 * (256 * 32 + 2 * layer + 32) + 12 * 2 * 32 * 128


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gpt2"])
def test_other_hf_model_types_build_and_run(model_type):
    model = build_model(_cfg(f"model_type={model_type}", "num_kv_heads=2"), Tok(), torch.device("cpu"))
    assert model.config.model_type == model_type
    ids = torch.randint(0, 250, (2, 8))
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_attention_choice_is_explicit():
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"
    with pytest.raises(UserError, match="flash_attention_2 needs CUDA and the flash-attn package"):
        resolve_attn_implementation("flash_attention_2", torch.device("cpu"))


def test_vocab_smaller_than_tokenizer_is_an_error():
    with pytest.raises(UserError, match=r"model\.vocab_size=100 is smaller than the tokenizer's vocabulary \(250\)"):
        build_model(_cfg("vocab_size=100"), Tok(), torch.device("cpu"))


def test_unknown_model_type_is_an_error():
    with pytest.raises(UserError, match="model.model_type='nosuchmodel'"):
        build_model(_cfg("model_type=nosuchmodel"), Tok(), torch.device("cpu"))


@pytest.mark.parametrize("path, params", [("configs/paper/slm_1.5b.yaml", 1.5e9), ("configs/paper/llm_2.8b.yaml", 2.8e9)])
def test_paper_scale_models_on_meta_device(path, params):
    """The paper-scale recipe's model sizes, built without allocating memory."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from slm_assist.salt.recipe import RunConfig
    from slm_assist.training.models import build_hf_config

    cfg = load_config(RunConfig, Path(__file__).resolve().parents[1] / path)
    hf = build_hf_config(cfg.model, 32000, {"bos": 1, "eos": 2, "pad": 0})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    n = count_params(model)
    assert abs(n - params) / params < 0.05, f"{path}: {n / 1e9:.3f}B params"
    assert cfg.train.zero_stage in (2, 3) and cfg.train.dtype == "bf16"
