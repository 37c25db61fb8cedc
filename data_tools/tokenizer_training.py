"""Make the run's tokenizer: train a sentencepiece model and save it as an HF tokenizer directory, or copy any HF
tokenizer directory. Every model in the pipeline shares this one vocabulary; loading it and its fingerprint (how
the stages check it) live in slm_assist/core/tokenizer.py. The command is `python -m data_tools.tokenizer`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from data_tools.corpus import CorpusConfig
from slm_assist.core.config import check, record_diff
from slm_assist.core.errors import UserError
from slm_assist.core.tokenizer import load_tokenizer

RECORD = "slm_assist_tokenizer.json"
"""Written into the tokenizer directory: the settings (and corpus) that made it, so that a tokenizer/ left in a
dataset directory is reused only for the same settings."""


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
    max_line_bytes: int = 4192
    """Training lines longer than this (UTF-8 bytes) are split at whitespace: sentencepiece silently skips longer
    ones, so a corpus of long single-line documents would teach it nothing."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 260, "vocab_size", self.vocab_size, ">= 260 (256 byte-fallback pieces + specials)")
        check(0.9 <= self.character_coverage <= 1.0, "character_coverage", self.character_coverage, "in [0.9, 1]")
        check(self.max_sentences > 0, "max_sentences", self.max_sentences, "> 0")
        check(self.max_line_bytes >= 64, "max_line_bytes", self.max_line_bytes, ">= 64")


_BEFORE_SPACE = re.compile(r"(?=\s)")


def training_lines(docs: Iterable[str], max_bytes: int, stats: dict[str, int]) -> Iterator[str]:
    """The documents' lines, each at most `max_bytes` UTF-8 bytes: longer lines are cut before a whitespace
    (the whitespace starts the next piece, as it would in running text), or anywhere when a word is longer.
    `stats` counts documents, lines, characters and the long lines that were split."""
    for doc in docs:
        stats["documents"] += 1
        for line in doc.split("\n"):
            if not line.strip():
                continue
            stats["characters"] += len(line)
            if len(line.encode("utf-8")) <= max_bytes:
                stats["lines"] += 1
                yield line
                continue
            stats["long_lines"] += 1
            piece, size = "", 0
            for word in _BEFORE_SPACE.split(line):
                n = len(word.encode("utf-8"))
                if size + n > max_bytes and piece:
                    stats["lines"] += 1
                    yield piece
                    piece, size = "", 0
                while n > max_bytes:  # one word longer than a line: cut it; 4 bytes per character at most
                    cut = max_bytes // 4
                    stats["lines"] += 1
                    yield word[:cut]
                    word = word[cut:]
                    n = len(word.encode("utf-8"))
                piece, size = piece + word, size + n
            if piece.strip():
                stats["lines"] += 1
                yield piece


def train_sentencepiece(docs: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> dict[str, int]:
    """Train sentencepiece on `docs` and write an HF tokenizer directory (tokenizer.json + the .model file).
    Returns what it trained on (documents, lines, characters, long lines split)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    stats = {"documents": 0, "lines": 0, "characters": 0, "long_lines": 0}
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for line in training_lines(docs, cfg.max_line_bytes, stats):
                f.write(line)
                f.write("\n")
        if not stats["lines"]:
            raise UserError(f"tokenizer training: the corpus has no text ({stats['documents']} documents, all "
                            "blank); check corpus.paths and corpus.text_field")
        sampled = min(1.0, cfg.max_sentences / stats["lines"])
        print(f"tokenizer: training on {stats['lines']:,} lines ({stats['characters']:,} characters) of "
              f"{stats['documents']:,} documents"
              + (f"; {stats['long_lines']:,} lines over {cfg.max_line_bytes} bytes split at whitespace"
                 if stats["long_lines"] else "")
              + (f"; sentencepiece samples {cfg.max_sentences:,} of them (~{sampled:.0%} of the characters, "
                 "tokenizer.max_sentences)" if sampled < 1 else ""), flush=True)
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
                max_sentence_length=cfg.max_line_bytes,
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
    stats["sampled_fraction"] = sampled
    return stats


def _made_with(cfg: TokenizerConfig, corpus: CorpusConfig) -> dict[str, Any]:
    """The settings a tokenizer directory depends on: for a copy only its source, else training and corpus."""
    return {"tokenizer": asdict(cfg), "corpus": None if cfg.path else asdict(corpus)}


def prepare_tokenizer(cfg: TokenizerConfig, corpus: CorpusConfig, docs: Iterable[str], out_dir: Path) -> None:
    """Write the run's tokenizer into `out_dir`: a copy of `cfg.path`, or a freshly trained sentencepiece on
    `docs` (read from the corpus config `corpus`), with a record of what made it."""
    trained: dict[str, Any] | None = None
    if cfg.path:
        load_tokenizer(cfg.path).save_pretrained(str(out_dir))
    else:
        trained = train_sentencepiece(docs, cfg, out_dir)
    record = {**_made_with(cfg, corpus), "trained_on": trained}
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_reusable(tok_dir: Path, cfg: TokenizerConfig, corpus: CorpusConfig) -> None:
    """A tokenizer directory left in a dataset dir (by data_tools.tokenizer) is reused only when the same
    settings made it: otherwise the config's tokenizer section would be silently ignored."""
    path = tok_dir / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{tok_dir}: exists but has no readable record of how it was made ({path.name}: {e}); "
                        "set overwrite=true to make it again, or tokenizer.path= to use a tokenizer as is") from None
    want = _made_with(cfg, corpus)
    diff = record_diff({k: record.get(k) for k in want}, want)
    if diff:
        raise UserError(f"{tok_dir} was made with other settings ({'; '.join(diff[:3])}); "
                        "set overwrite=true to make it again with this config")
