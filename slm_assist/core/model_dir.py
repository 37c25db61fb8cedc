"""The model directory: a `save_pretrained` folder (config.json, safetensors) with its tokenizer and, when
slm_assist exported it, the run metadata `slm_assist.json`. The one place that opens one, checks it, loads
its model, and writes one.

Run metadata: `run_config`, `data_manifest`, `params`, `step`, `tokens_seen`, and `stages`, a list that later
stages append to (`append_stage`) and the model card renders.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError
from slm_assist.core.files import atomic_write_text
from slm_assist.core.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_fingerprint

CONFIG = "config.json"
META = "slm_assist.json"
MODEL_FILES = (CONFIG, "generation_config.json", "model.safetensors", "model-[0-9]*-of-[0-9]*.safetensors",
               "model.safetensors.index.json", META, *TOKENIZER_FILES)
"""What `write_model_dir` writes (save_pretrained's names): anything else in a model directory (an adapter, notes)
is not ours."""


_FINGERPRINTS: dict[tuple, str] = {}


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """transformers does not fall back on its own when flash-attn is missing, so we decide here, explicitly."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda"):
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
            f"(pip install -e .[gpu]); device={device.type}, flash_attn installed={has_flash}. Use auto or sdpa."
        )
    return requested


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(the decoder trunk, the output head) of an HF causal LM whose logits are exactly head(last hidden state),
    so a caller may run the head itself, a chunk at a time; None for a model that also soft-caps or scales its
    logits, or has no such split."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    c = model.config
    if head is None or decoder is None or getattr(c, "final_logit_softcapping", None) or \
            getattr(c, "logit_scale", None) not in (None, 1.0):
        return None
    return decoder, head


class ModelDir:
    """An opened model directory. `field` is the setting or argument that named it (`distill.teacher`,
    `model`...): every error starts with `field=path`, so the user knows what to change."""

    def __init__(self, path: str | Path, field: str = "") -> None:
        self.path = Path(path)
        self.name = f"{field}={path}" if field else str(path)

    @classmethod
    def open(cls, path: str | Path, field: str = "") -> ModelDir:
        d = cls(path, field)
        if not (d.path / CONFIG).is_file():
            raise UserError(f"{d.name}: not a save_pretrained model directory (no {CONFIG})")
        return d

    @functools.cached_property
    def tokenizer(self):
        if not (self.path / "tokenizer_config.json").is_file():
            raise UserError(f"{self.name}: no tokenizer files next to the model; cannot check that it shares the "
                            "data's vocabulary (save the tokenizer into the model directory)")
        return load_tokenizer(self.path)

    def check_vocabulary(self, data: PackedDataset, why: str) -> None:
        """This model's tokenizer must be the data's (by fingerprint), checked before any work is done."""
        data.check_tokenizer(tokenizer_fingerprint(self.tokenizer), self.name, why)

    def config(self):
        """The model's transformers config (config.json), without loading weights."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.path))
        except Exception as e:
            raise UserError(f"{self.name}: unreadable {CONFIG}: {e}") from None

    def context_length(self) -> int | None:
        """The longest sequence its position embeddings cover (config.json), or None when it does not say."""
        try:
            cfg = json.loads((self.path / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{self.name}: unreadable {CONFIG}: {e}") from None
        n = cfg.get("max_position_embeddings", cfg.get("n_positions"))
        return n if isinstance(n, int) else None

    def check_context(self, seq_len: int, why: str) -> None:
        """Sequences of `seq_len` must fit its position embeddings (gpt2 fails with an IndexError, RoPE models
        silently extrapolate)."""
        n = self.context_length()
        if n is not None and n < seq_len:
            raise UserError(f"{self.name}: max_position_embeddings={n} is below the data's seq_len={seq_len}; {why}")

    def load(self, device: torch.device, vocab: int, dtype: torch.dtype | str = "auto",
             attn_implementation: str | None = "auto") -> torch.nn.Module:
        """The model on `device` (dtype "auto" = as saved), with at least `vocab` (the tokenizer's real
        vocabulary) output rows; padded rows beyond it are fine. `attn_implementation` None = transformers'
        own default (sdpa where available)."""
        from transformers import AutoModelForCausalLM

        attn = {} if attn_implementation is None else {
            "attn_implementation": resolve_attn_implementation(attn_implementation, device)}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=dtype, **attn)
        except Exception as e:
            raise UserError(f"{self.name}: cannot load: {e}") from None
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise UserError(f"{self.name}: {rows} output rows < the tokenizer's {vocab} tokens; "
                            "wrong tokenizer for this model")
        return model.to(device)

    def meta(self) -> dict[str, Any] | None:
        """The run metadata slm_assist exported with the model, or None for a model from elsewhere."""
        path = self.path / META
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt run metadata: {e}") from None

    def fingerprint(self) -> str:
        """sha256 of the config and weight files: what a scoring run is keyed by and a resume compares. Hashed
        once per process for the same files (by name, size and modification time): a compress launch asks for
        its teacher's several times."""
        files = sorted(f for f in [self.path / CONFIG, *self.path.glob("*.safetensors"), *self.path.glob("*.bin")]
                       if f.is_file())
        key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if key not in _FINGERPRINTS:
            h = hashlib.sha256()
            for path in files:
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
            _FINGERPRINTS[key] = h.hexdigest()[:16]
        return _FINGERPRINTS[key]


def write_model_dir(out: Path, model: torch.nn.Module, tokenizer, meta: dict[str, Any] | None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + run metadata (None: a model no run made, e.g. a student's
    init) into `out` (callers write into a temp dir): the one writer of a model directory."""
    model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if meta is not None:
        (out / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def append_stage(model_dir: str | Path, stage: dict[str, Any]) -> None:
    """Add a stage record ({"name", "summary", "metrics"}) to an exported model's run metadata, atomically."""
    d = ModelDir.open(model_dir)
    meta = d.meta()
    if meta is None:
        raise UserError(f"{model_dir}: no {META}; not a model exported by slm_assist")
    meta.setdefault("stages", []).append(stage)
    atomic_write_text(d.path / META, json.dumps(meta, indent=2, default=str) + "\n")
