"""The packed dataset (written by `data_tools.pack`): the one place that reads and writes its files.

    <dir>/manifest.json   tokenizer fingerprint, seq_len, split counts; written last, so it marks a complete dataset
    <dir>/tokenizer/      the HF tokenizer every model of the pipeline shares
    <dir>/train/, <dir>/validation/   Arrow datasets, one row per sequence: `input_ids` (int32, length seq_len)
    <dir>/prepare_config.yaml   the resolved pack config (corpus, tokenizer, packing): how to re-read its documents
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from slm_assist.core.errors import UserError, brief
from slm_assist.core.files import atomic_write_text
from slm_assist.core.tokenizer import load_tokenizer, tokenizer_fingerprint

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer"
PREPARE_CONFIG = "prepare_config.yaml"
SPLITS = ("train", "validation")
FORMAT_VERSION = 1
ARROW_FILES = ("data-*.arrow", "dataset_info.json", "state.json")
"""What `datasets.Dataset.save_to_disk` writes into its directory."""


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a packed dataset; its absence means the dataset is missing or incomplete."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir}: no {MANIFEST}; not a packed dataset (or packing did not finish). "
                        "Run `python -m data_tools.pack CONFIG`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt manifest: {e}") from None


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Written last (atomically): from here on the directory is a complete dataset."""
    atomic_write_text(Path(data_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def dataset_fingerprint(manifest: dict[str, Any]) -> str:
    """Identifies a packed dataset (tokenizer, seq_len, split sizes...): what scores and caches are keyed by."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def write_split(rows: np.ndarray, path: Path) -> None:
    """[n, seq_len] token rows as an Arrow dataset with one `input_ids` column (fixed-size int32 lists)."""
    import datasets
    import pyarrow as pa

    flat = pa.array(rows.reshape(-1), type=pa.int32())
    col = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1]) if rows.size else pa.array([], pa.list_(pa.int32(), rows.shape[1]))
    datasets.Dataset(pa.table({"input_ids": col})).save_to_disk(str(path))


def load_split(data_dir: str | Path, split: str):
    """The Arrow dataset of one split, as numpy rows of int32 token ids (memory-mapped, not copied)."""
    import datasets

    path = Path(data_dir) / split
    if not path.is_dir():
        raise UserError(f"{data_dir}: split '{split}' not found ({path})")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot load the packed split: {e}") from None
    if "input_ids" not in ds.column_names:
        raise UserError(f"{path}: no 'input_ids' column (columns: {ds.column_names})")
    return ds.with_format("numpy")


def _damaged_file(path: Path) -> str | None:
    """The first file of the Arrow dataset saved in `path` that does not read back (missing, cut short, not
    JSON), or None when none is found. Only called on a failure: it reads every record batch's header."""
    import pyarrow as pa

    for name in ("state.json", "dataset_info.json"):
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return name
    try:
        listed = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (KeyError, TypeError, ValueError, OSError):
        listed = sorted(p.name for p in path.glob("data-*.arrow"))
    for name in listed:
        try:
            with pa.memory_map(str(path / name)) as m:
                for _ in pa.ipc.open_stream(m):
                    pass
        except (OSError, ValueError, pa.ArrowException):
            return name
    return None


def load_arrow(path: str | Path, what: str, remedy: str):
    """The `datasets` Arrow dataset saved in directory `path`. One that does not read back (a file cut short by a
    full disk or an interrupted copy, a missing file) is a UserError that starts with `what`, names the damaged
    file and ends with `remedy`."""
    import datasets

    path = Path(path)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # OSError from pyarrow (truncated), FileNotFoundError, JSON and Arrow errors
        bad = _damaged_file(path)
        where = path / bad if bad else path
        raise UserError(f"{what}: {where} is damaged and cannot be read ({brief(e)}); {remedy}") from None


class PackedDataset:
    """An opened packed dataset: its manifest at once; its tokenizer (checked against the manifest's fingerprint)
    and splits on first use."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest

    @classmethod
    def open(cls, path: str | Path) -> PackedDataset:
        return cls(path, read_manifest(path))

    @property
    def fingerprint(self) -> str:
        return dataset_fingerprint(self.manifest)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    def has_split(self, name: str) -> bool:
        return name in self.manifest["splits"]

    @functools.cached_property
    def tokenizer(self):
        tok = load_tokenizer(self.path / TOKENIZER)
        if tokenizer_fingerprint(tok) != self.tokenizer_fingerprint:
            raise UserError(f"{self.path}: tokenizer/ does not match the manifest's tokenizer_fingerprint; "
                            "the data was packed with another tokenizer: re-run data_tools.pack")
        return tok

    def split(self, name: str, field: str = "split"):
        """A split's rows; `field` names the setting that asked for it, for the error."""
        if not self.has_split(name):
            raise UserError(f"{field}={name!r}: {self.path} has no such split (splits: {list(self.manifest['splits'])})")
        return load_split(self.path, name)

    def check_tokenizer(self, fingerprint: str, who: str, why: str) -> None:
        """`who` (a model, a cache...) must use this dataset's vocabulary; the error names both fingerprints."""
        if fingerprint != self.tokenizer_fingerprint:
            raise UserError(f"{who}: tokenizer fingerprint {fingerprint} differs from the data's "
                            f"{self.tokenizer_fingerprint} ({self.path}); {why}")


def _span_hashes(rows: np.ndarray, n: int, stride: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-token window starting at a multiple of `stride` in each row (wrapping
    uint64 arithmetic: exact as a hash, no overflow checks wanted)."""
    rows = rows.astype(np.uint64)
    starts = np.arange(0, rows.shape[1] - n + 1, stride)
    h = np.zeros((rows.shape[0], len(starts)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(1_000_003) + rows[:, starts + k] + np.uint64(1)
    return h.reshape(-1)


def _sample_rows(data: PackedDataset, max_tokens: int) -> tuple[np.ndarray, float]:
    """Every split's rows, or evenly spaced ones up to `max_tokens`; and the share of the rows taken."""
    parts, total = [], sum(s["tokens"] for s in data.manifest["splits"].values())
    keep = min(1.0, max_tokens / max(1, total))
    for name in data.manifest["splits"]:
        split = data.split(name)
        idx = np.unique(np.linspace(0, len(split) - 1, max(1, round(len(split) * keep))).astype(np.int64)) \
            if len(split) else np.zeros(0, np.int64)
        if len(idx):
            parts.append(np.asarray(split.select(idx)["input_ids"]))
    return (np.concatenate(parts) if parts else np.zeros((0, data.seq_len), np.int32)), keep


def shared_span_share(data: PackedDataset, other: PackedDataset, n: int = 16,
                      max_tokens: int = 16_000_000) -> tuple[float, float]:
    """The share of `data`'s n-token spans (non-overlapping, every split) that also occur anywhere in `other`: how
    much of one corpus the other contains (same tokenizer). Large datasets are sampled by evenly spaced rows up to
    `max_tokens` each; returns (share, the share of `other`'s rows searched)."""
    mine, _ = _sample_rows(data, max_tokens)
    theirs, searched = _sample_rows(other, max_tokens)
    if not len(mine) or not len(theirs) or data.seq_len < n:
        return 0.0, searched
    spans = _span_hashes(mine, n, n)
    found = np.isin(spans, np.unique(_span_hashes(theirs, n, 1)))
    return float(found.mean()), searched
