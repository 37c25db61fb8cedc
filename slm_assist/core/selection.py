"""The selection (written by `data_tools.select`): `index.npy`, sorted unique int64 sequence indices into the
train split; `selection.json`, its summary (policy, kept, total, config; `flagged` with max_confident_wrong); and
`README.md`, its Hugging Face dataset card, with the `hist_*.png` figures it links. The one place that reads and
writes the index and summary, and that names the card's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slm_assist.core.errors import UserError

INDEX = "index.npy"
SUMMARY = "selection.json"
CARD = "README.md"
FIGURES = "hist_*.png"  # the score histograms that the card and report.md link


def write_selection(out_dir: Path, index: np.ndarray, summary: dict[str, Any]) -> None:
    np.save(out_dir / INDEX, np.sort(index).astype(np.int64))
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def read_index(path: str | Path, n_rows: int, field: str) -> np.ndarray:
    """A selection index: sorted unique sequence indices within a split of `n_rows` rows. `path` may also be
    the data_tools.select output directory that holds it."""
    p = Path(path)
    if p.is_dir() and (p / INDEX).is_file():
        p = p / INDEX
    try:
        with open(p, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"
        idx = np.load(p) if is_npy else None
    except (OSError, ValueError) as e:
        raise UserError(f"{field}={path}: cannot read a .npy index: {e}") from None
    if idx is None:
        raise UserError(f"{field}={path}: not a .npy file (expected the {INDEX} that data_tools.select writes)")
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (len(idx) and (idx.min() < 0 or idx.max() >= n_rows)):
        raise UserError(f"{field}={path}: expected a 1-D array of sequence indices in [0, {n_rows}), "
                        f"got shape {idx.shape}, dtype {idx.dtype}")
    return np.unique(idx)


def selection_dir(index_path: str | Path) -> Path:
    """The data_tools.select output directory of an index (`distill.data.selection` may name either; for a path that is
    gone, a `.npy` name is taken as the index file)."""
    p = Path(index_path)
    return p.parent if p.is_file() or (not p.is_dir() and p.suffix == ".npy") else p


def card_files(index_path: str | Path) -> list[Path] | None:
    """The dataset card written next to an index, then the figures it links; None when there is no card (the
    selection was moved or deleted, or written before select wrote cards)."""
    d = selection_dir(index_path)
    if not (d / CARD).is_file():
        return None
    return [d / CARD, *sorted(d.glob(FIGURES))]


def read_summary(index_path: str | Path) -> dict[str, Any] | None:
    """The summary written next to an index, or None when the index came from elsewhere."""
    path = selection_dir(index_path) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, not UTF-8
        raise UserError(f"{path}: corrupt selection summary: {e}") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: corrupt selection summary: not a JSON object")
    return summary
