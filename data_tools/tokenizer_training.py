"""Make the run's tokenizer: train a sentencepiece model and save it as an HF tokenizer directory, or copy any HF
tokenizer directory. Every model in the pipeline shares this one vocabulary; loading it and its fingerprint (how
the stages check it) live in slm_assist/core/tokenizer.py. The command is `python -m data_tools.tokenizer`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slm_assist.core.config import check
from slm_assist.core.errors import UserError
from slm_assist.core.tokenizer import load_tokenizer


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


def prepare_tokenizer(cfg: TokenizerConfig, docs: Iterable[str], out_dir: Path) -> None:
    """Write the run's tokenizer into `out_dir`: a copy of `cfg.path`, or a freshly trained sentencepiece."""
    if cfg.path:
        tok = load_tokenizer(cfg.path)
        tok.save_pretrained(str(out_dir))
    else:
        train_sentencepiece(docs, cfg, out_dir)
