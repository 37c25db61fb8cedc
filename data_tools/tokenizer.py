"""Train a sentencepiece tokenizer and save it as an HF tokenizer directory, or load any HF tokenizer directory.

`python -m data_tools.tokenizer CONFIG [overrides]` trains (or copies) the tokenizer into `<out_dir>/tokenizer`.
Every model in the pipeline shares this one vocabulary; `tokenizer_fingerprint` is how the stages check it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slm_assist.config import check
from slm_assist.errors import UserError

# Probe text for the fingerprint: two tokenizers with the same vocab but different normalisation differ here.
_PROBE = "Hello, World! \t  x = f(1.5e-3)  # naïve café 🤖\n\ndef g():\n    return None"


@dataclass
class TokenizerConfig:
    path: str = ""
    """An existing HF tokenizer directory to use as is ("" = train a sentencepiece model on the corpus)."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 4096
    character_coverage: float = 0.9995
    """Fraction of characters covered by the vocabulary; the rest fall back to bytes."""
    max_sentences: int = 2_000_000
    """Lines sampled for training (caps sentencepiece's memory and time on big corpora)."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 260, "vocab_size", self.vocab_size, ">= 260 (256 byte-fallback pieces + specials)")
        check(0.9 <= self.character_coverage <= 1.0, "character_coverage", self.character_coverage, "in [0.9, 1]")
        check(self.max_sentences > 0, "max_sentences", self.max_sentences, "> 0")


def train_sentencepiece(docs: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> None:
    """Train sentencepiece on `docs` and write an HF tokenizer directory (tokenizer.json + the .model file)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(doc)
                f.write("\n")
        spm_dir = Path(tmp) / "spm"
        spm_dir.mkdir()
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file),
                model_prefix=str(spm_dir / "tokenizer"),
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                input_sentence_size=cfg.max_sentences,
                shuffle_input_sentence=True,
                # Byte fallback: no <unk> on unseen characters. Identity normalisation and no dummy prefix keep
                # whitespace (code indentation) intact and make HF's conversion token-for-token identical.
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise UserError(f"sentencepiece training failed (tokenizer.vocab_size={cfg.vocab_size}): {e}") from None
        tok = LlamaTokenizer.from_pretrained(
            str(spm_dir), legacy=False, add_prefix_space=False, pad_token="<pad>",
            add_bos_token=False, add_eos_token=False,
        )
        tok.save_pretrained(str(out_dir))
        shutil.copy(spm_dir / "tokenizer.model", out_dir / "sentencepiece.model")


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


def prepare_tokenizer(cfg: TokenizerConfig, docs: Iterable[str], out_dir: Path) -> None:
    """Write the run's tokenizer into `out_dir`: a copy of `cfg.path`, or a freshly trained sentencepiece."""
    if cfg.path:
        tok = load_tokenizer(cfg.path)
        tok.save_pretrained(str(out_dir))
    else:
        train_sentencepiece(docs, cfg, out_dir)


def main(argv: Sequence[str]) -> None:
    from data_tools.corpus import read_documents
    from data_tools.pack import PrepareConfig, load_prepare_config
    from slm_assist.fsutil import atomic_output_dir

    cfg: PrepareConfig = load_prepare_config(argv, "python -m data_tools.tokenizer CONFIG [key=value ...]")
    target = Path(cfg.out_dir) / "tokenizer"
    with atomic_output_dir(target, overwrite=cfg.overwrite) as tmp:
        prepare_tokenizer(cfg.tokenizer, read_documents(cfg.corpus), tmp)
    (Path(cfg.out_dir) / "manifest.json").unlink(missing_ok=True)  # data packed with an old tokenizer is stale
    tok = load_tokenizer(target)
    print(f"tokenizer: {target} (vocab {len(tok)}, fingerprint {tokenizer_fingerprint(tok)})")


if __name__ == "__main__":
    from slm_assist.errors import run_cli

    run_cli(main)
