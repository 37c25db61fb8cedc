"""The selection (written by `data_tools.select`): `index.npy`, sorted unique int64 sequence indices into the
train split, and `selection.json`, its summary (policy, kept, total, config). The one place that reads and
writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slm_assist.core.errors import UserError

INDEX = "index.npy"
SUMMARY = "selection.json"


def write_selection(out_dir: Path, index: np.ndarray, summary: dict[str, Any]) -> None:
    np.save(out_dir / INDEX, np.sort(index).astype(np.int64))
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def read_index(path: str | Path, n_rows: int, field: str) -> np.ndarray:
    """A selection index: sorted unique sequence indices within a split of `n_rows` rows."""
    try:
        idx = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{field}={path}: cannot read a .npy index: {e}") from None
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (len(idx) and (idx.min() < 0 or idx.max() >= n_rows)):
        raise UserError(f"{field}={path}: expected a 1-D array of sequence indices in [0, {n_rows}), "
                        f"got shape {idx.shape}, dtype {idx.dtype}")
    return np.unique(idx)


def read_summary(index_path: str | Path) -> dict[str, Any] | None:
    """The summary written next to an index, or None when the index came from elsewhere."""
    path = Path(index_path).parent / SUMMARY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
