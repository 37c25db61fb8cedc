"""Read a corpus into documents: plain text (blank-line separated, optionally .gz), jsonl, parquet, or a
`datasets` directory saved with `save_to_disk`. Bad input names the file and, where it applies, the line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slm_assist.core.config import check
from slm_assist.core.errors import UserError
from slm_assist.core.files import atomic_write_text


@dataclass
class CorpusConfig:
    paths: list[str] = field(default_factory=list)
    """Files or directories to read, in order. Empty = the embedded demo corpus."""
    format: Literal["auto", "text", "jsonl", "parquet", "datasets"] = "auto"
    """auto: by suffix (.txt/.gz -> text, .jsonl/.json -> jsonl, .parquet -> parquet, directory -> datasets)."""
    text_field: str = "text"
    """Column / JSON key holding the document text (jsonl, parquet, datasets)."""
    on_decode_error: Literal["error", "replace"] = "error"
    """Non-UTF-8 bytes: `error` reports file and line; `replace` substitutes U+FFFD and counts them."""
    min_chars: int = 1
    """Documents shorter than this (after stripping) are dropped."""
    max_docs: int = -1
    """Read at most this many documents (-1 = all)."""

    def __post_init__(self) -> None:
        check(self.min_chars >= 1, "min_chars", self.min_chars, ">= 1")
        check(self.max_docs == -1 or self.max_docs > 0, "max_docs", self.max_docs, "-1 or > 0")


def demo_corpus_path() -> Path:
    return Path(__file__).parent / "demo_corpus" / "pydoc_demo.jsonl.gz"


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _open_lines(path: Path, on_error: str) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if on_error == "replace":
                        yield lineno, raw.decode("utf-8", errors="replace")
                        continue
                    raise UserError(
                        f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                        "fix the file or set corpus.on_decode_error=replace"
                    ) from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"corpus file not found: {path}") from None
        raise UserError(f"{path}: cannot read: {e}") from None


def _read_text(path: Path, on_error: str) -> Iterator[str]:
    """One document per blank-line separated block."""
    buf: list[str] = []
    for _, line in _open_lines(path, on_error):
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf)
            buf = []
    if buf:
        yield "".join(buf)


def _read_jsonl(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    for lineno, line in _open_lines(path, cfg.on_decode_error):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict) or cfg.text_field not in row:
            raise UserError(f"{path}:{lineno}: missing field '{cfg.text_field}' (set corpus.text_field)")
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field '{cfg.text_field}' is {type(text).__name__}, not a string")
        yield text


def _read_columnar(path: Path, fmt: str, cfg: CorpusConfig) -> Iterator[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path}: cannot read parquet: {e}") from None
        names = table.column_names
        column = table.column(cfg.text_field) if cfg.text_field in names else None
    else:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a `datasets` directory saved with save_to_disk: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        names = ds.column_names
        column = ds.data.column(cfg.text_field) if cfg.text_field in names else None
    if column is None:
        raise UserError(f"{path}: missing field '{cfg.text_field}' (columns: {names}); set corpus.text_field")
    for row, text in enumerate(column.to_pylist()):
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}: row {row}: field '{cfg.text_field}' is {type(text).__name__}, not a string")
        yield text or ""


def read_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield documents (stripped, non-empty) from every configured path, in order."""
    paths = [Path(p) for p in cfg.paths] or [demo_corpus_path()]
    count = 0
    for path in paths:
        if not path.exists():
            raise UserError(f"corpus path not found: {path} (corpus.paths)")
        fmt = _detect_format(path) if cfg.format == "auto" else cfg.format
        if fmt == "text":
            docs = _read_text(path, cfg.on_decode_error)
        elif fmt == "jsonl":
            docs = _read_jsonl(path, cfg)
        else:
            docs = _read_columnar(path, fmt, cfg)
        for doc in docs:
            doc = doc.strip()
            if len(doc) < cfg.min_chars:
                continue
            yield doc
            count += 1
            if count == cfg.max_docs:
                return
    if count == 0:
        raise UserError(f"empty corpus: no document with >= {cfg.min_chars} characters in {', '.join(map(str, paths))}")


def joined_documents(paths: list[Path], chars: float = float("inf"), doc_chars: int = 2000) -> list[str]:
    """About the first `chars` characters of blank-line separated corpora, taken from each in turn (one domain
    mix), as documents of about `doc_chars`: files that split at every blank line (paragraphs) are joined back
    into runs of consecutive paragraphs, so that cloze items have context and a validation split by document
    holds whole passages."""
    readers = [read_documents(CorpusConfig(paths=[str(p)])) for p in paths]
    out: list[str] = []
    total = 0
    while total < chars and readers:
        for r in list(readers):
            parts: list[str] = []
            for para in r:
                parts.append(para)
                if sum(map(len, parts)) >= doc_chars:
                    break
            else:
                readers.remove(r)
            if parts:
                out.append("\n\n".join(parts))
                total += len(out[-1])
    return out


def write_jsonl(path: Path, docs: list[str]) -> None:
    """Documents as a jsonl corpus (`{"text": ...}` per line), written atomically."""
    atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
