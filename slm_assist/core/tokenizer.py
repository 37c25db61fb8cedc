"""The tokenizer directory (HF format): loading it, and the fingerprint by which every stage checks that two
artifacts share one vocabulary. Written by data_tools.pack (tokenizer/) and next to every exported model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slm_assist.core.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
                   "merges.txt", "sentencepiece.model", "slm_assist_tokenizer.json")
"""The names an HF tokenizer's save_pretrained (and our tokenizer record) write: exact names, so that a file of
the user's next to them (tokenizer_notes.md) is never taken for ours."""

# Probe text for the fingerprint: two tokenizers with the same vocab but different normalisation differ here.
_PROBE = "Hello, World! \t  x = f(1.5e-3)  # naïve café 🤖\n\ndef g():\n    return None"


def load_tokenizer(path: str | Path):
    """Load an HF tokenizer directory; it must define an EOS token (packing separates documents with it)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot load as an HF tokenizer: {e}") from None
    if tok.eos_token_id is None:
        raise UserError(f"{path}: tokenizer has no eos_token; set one in tokenizer_config.json")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the vocabulary, the special tokens and the encoding of a probe text (first 16 hex chars)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    probe = tok(_PROBE, add_special_tokens=False)["input_ids"]
    blob = json.dumps({"vocab": vocab, "specials": specials, "probe": probe}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
