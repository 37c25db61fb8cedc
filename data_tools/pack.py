"""Pack a corpus into fixed-length token sequences stored as `datasets` Arrow, split into train/validation by
document.

`python -m data_tools.pack CONFIG [overrides]` writes into `out_dir`:
  tokenizer/       HF tokenizer directory (trained, copied from `tokenizer.path`, or reused when
                   `data_tools.tokenizer` made it there with the same settings)
  train/           Arrow dataset, one row per sequence: `input_ids` (int32, length seq_len)
  validation/      same, from held-out documents only
  manifest.json    tokenizer fingerprint, seq_len and counts; written last, so it marks a complete dataset
Each document is followed by EOS; sequences are cut from the concatenated stream, and the tail shorter than
seq_len is dropped (counted in the manifest). The format's reader and writer are slm_assist/core/dataset.py.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.corpus import CorpusConfig, read_documents
from data_tools.tokenizer_training import TokenizerConfig, check_reusable, prepare_tokenizer
from slm_assist.core.config import check, parse_cli, save_config
from slm_assist.core.dataset import (
    FORMAT_VERSION,
    MANIFEST,
    PREPARE_CONFIG,
    SPLITS,
    TOKENIZER,
    write_manifest,
    write_split,
)
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_output_dir, check_output_dir, foreign_entries
from slm_assist.core.tokenizer import load_tokenizer, tokenizer_fingerprint


@dataclass
class PackConfig:
    seq_len: int = 256
    """Tokens per sequence."""
    val_fraction: float = 0.02
    """Fraction of *documents* held out for validation (0 = no validation split)."""
    seed: int = 0
    """Seeds the document-level split."""
    batch_docs: int = 512
    """Documents tokenized per call (speed only)."""

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "in [0, 1)")
        check(self.batch_docs > 0, "batch_docs", self.batch_docs, "> 0")


@dataclass
class PrepareConfig:
    out_dir: str = "data/demo"
    """Dataset directory (tokenizer/, train/, validation/, manifest.json)."""
    overwrite: bool = False
    """Replace an existing non-empty output."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)


def load_prepare_config(argv: Sequence[str], usage: str, *, description: str | None = __doc__,
                        example: str = "") -> PrepareConfig:
    """The config of pack and tokenizer; `description`/`example` are for `--help`."""
    return parse_cli(argv, PrepareConfig, usage, description=description, example=example)


def is_validation_doc(index: int, seed: int, fraction: float) -> bool:
    """Deterministic, order-independent document split: a hash of (seed, index) against the fraction."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def pack_token_stream(docs_ids: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by EOS, and cut into rows of seq_len. Returns (rows, dropped tail)."""
    lengths = [len(d) + 1 for d in docs_ids]
    stream = np.empty(sum(lengths), dtype=np.int32)
    pos = 0
    for ids, n in zip(docs_ids, lengths):
        stream[pos : pos + n - 1] = ids
        stream[pos + n - 1] = eos_id
        pos += n
    n_rows = len(stream) // seq_len
    return stream[: n_rows * seq_len].reshape(n_rows, seq_len), len(stream) - n_rows * seq_len


def tokenize_documents(docs: list[str], tok, batch_docs: int) -> list[list[int]]:
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    with tqdm(total=len(docs), desc="tokenize", unit="doc") as bar:
        for i in range(0, len(docs), batch_docs):
            batch = docs[i : i + batch_docs]
            out.extend(tok(batch, add_special_tokens=False)["input_ids"])
            bar.update(len(batch))
    return out


OUTPUT = (TOKENIZER, *SPLITS, MANIFEST, PREPARE_CONFIG)
"""Everything pack writes into out_dir: with overwrite=true it replaces a directory holding only these."""


def _leftover_tokenizer_ok(cfg: PrepareConfig, out: Path) -> bool:
    """Whether out_dir/tokenizer, left there by `data_tools.tokenizer`, may stay without overwrite=true: it must
    be what this config makes (its record for a trained one, the fingerprint for a copy of tokenizer.path).
    With overwrite=true the tokenizer is made again, like the rest of the output."""
    tok_dir = out / TOKENIZER
    if cfg.overwrite or not tok_dir.is_dir():
        return False
    if cfg.tokenizer.path:
        if tokenizer_fingerprint(load_tokenizer(tok_dir)) != tokenizer_fingerprint(load_tokenizer(cfg.tokenizer.path)):
            raise UserError(f"{tok_dir} is not a copy of tokenizer.path={cfg.tokenizer.path}; set overwrite=true "
                            "to replace it")
        return True
    check_reusable(tok_dir, cfg.tokenizer, cfg.corpus)
    return True


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Tokenizer -> tokenize -> split by document -> pack -> save. Returns the manifest.

    Every input is read and checked before out_dir is touched; the new dataset is built in a temp directory and
    renamed over the old one only when complete, so a failure leaves out_dir exactly as it was."""
    out = Path(cfg.out_dir)
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # a bad path fails before the corpus is read
    leftover_ok = _leftover_tokenizer_ok(cfg, out)
    if not cfg.overwrite and out.is_dir() and foreign_entries(out, [TOKENIZER] if leftover_ok else []):
        check_output_dir(out, overwrite=False)  # raises: names the flag
    check_output_dir(out, overwrite=True, own=OUTPUT)  # writable, and holds nothing but our own output

    t0 = time.time()
    docs = list(read_documents(cfg.corpus))
    with atomic_output_dir(out, OUTPUT, overwrite=True) as tmp:
        if leftover_ok and not cfg.tokenizer.path:  # a copy of tokenizer.path is made afresh
            print(f"reusing tokenizer {out / TOKENIZER}")
            shutil.copytree(out / TOKENIZER, tmp / TOKENIZER)
        else:
            (tmp / TOKENIZER).mkdir()
            prepare_tokenizer(cfg.tokenizer, cfg.corpus, docs, tmp / TOKENIZER)
        tok = load_tokenizer(tmp / TOKENIZER)
        manifest = _pack_splits(cfg, docs, tok, tmp)
        save_config(cfg, tmp / PREPARE_CONFIG)
        write_manifest(tmp, manifest)
    s = manifest["splits"]
    print(
        f"packed {out}: train {s['train']['sequences']} x {cfg.pack.seq_len} tokens from {s['train']['documents']} docs"
        + (f", validation {s['validation']['sequences']} from {s['validation']['documents']} docs" if "validation" in s else "")
        + f" ({time.time() - t0:.1f}s)"
    )
    return manifest


def _pack_splits(cfg: PrepareConfig, docs: list[str], tok, out: Path) -> dict[str, Any]:
    """Tokenize, split by document, pack and write each split into `out`; returns the manifest."""
    ids = tokenize_documents(docs, tok, cfg.pack.batch_docs)
    is_val = [is_validation_doc(i, cfg.pack.seed, cfg.pack.val_fraction) for i in range(len(ids))]
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "seq_len": cfg.pack.seq_len,
        "val_fraction": cfg.pack.val_fraction,
        "seed": cfg.pack.seed,
        "sources": list(cfg.corpus.paths) or ["<embedded demo corpus>"],
        "splits": {},
    }
    for split in SPLITS:
        want_val = split == "validation"
        if want_val and cfg.pack.val_fraction == 0:
            continue
        split_ids = [d for d, v in zip(ids, is_val) if v == want_val]
        rows, dropped = pack_token_stream(split_ids, tok.eos_token_id, cfg.pack.seq_len)
        if len(rows) == 0:
            raise UserError(
                f"split '{split}' has {len(split_ids)} documents, too few tokens for one sequence of "
                f"pack.seq_len={cfg.pack.seq_len}; use a larger corpus, a shorter seq_len or another pack.val_fraction"
            )
        write_split(rows, out / split)
        manifest["splits"][split] = {
            "documents": len(split_ids),
            "sequences": int(rows.shape[0]),
            "tokens": int(rows.size),
            "dropped_tail_tokens": int(dropped),
        }
    return manifest


def main(argv: Sequence[str]) -> None:
    prepare(load_prepare_config(argv, "python -m data_tools.pack CONFIG [key=value ...]", example=(
        "python -m data_tools.pack configs/demo/data.yaml corpus.paths=[my.jsonl] out_dir=data/mine")))


if __name__ == "__main__":
    run_cli(main)
