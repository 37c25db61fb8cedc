"""Packed token data for training: a deterministic, resumable batch order, sharded by data-parallel rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm_assist.errors import UserError


@dataclass
class DataConfig:
    path: str = "runs/demo/data"
    """A directory written by `python -m data_tools.pack` (manifest.json, tokenizer/, train/, validation/)."""
    seed: int = 0
    """Seeds the shuffle order; epoch e uses a permutation seeded by (seed, e)."""


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


class ShardedBatches:
    """Micro-batches of `input_ids` for one data-parallel rank, in a seeded order that spans epochs.

    The whole state is (epoch, cursor): `cursor` counts sequences consumed by *all* ranks in the current epoch's
    permutation, so the same state resumes exactly, and rank r of W takes rows [cursor + r*B, cursor + (r+1)*B).
    The tail of an epoch that cannot fill a global batch is skipped. `rows` restricts the stream to a subset of
    the split (e.g. a data_tools.select index), shuffled the same way.
    """

    def __init__(self, dataset, micro_batch: int, rank: int, world: int, seed: int,
                 rows: np.ndarray | None = None) -> None:
        self.ds, self.mb, self.rank, self.world, self.seed = dataset, micro_batch, rank, world, seed
        self.rows = rows
        self.n = len(dataset) if rows is None else len(rows)
        if self.n < micro_batch * world:
            what = "the training split" if rows is None else "the selected subset"
            raise UserError(f"{what} has {self.n} sequences, fewer than one global micro-batch "
                            f"(train.micro_batch_size={micro_batch} x {world} ranks)")
        self.epoch, self.cursor = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).numpy()
        return self._perm

    def next(self) -> torch.Tensor:
        return self.next_with_index()[0]

    def next_with_index(self) -> tuple[torch.Tensor, np.ndarray]:
        """The next micro-batch and the split indices of its sequences (for soft-label cache lookups)."""
        if self.cursor + self.mb * self.world > self.n:
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        start = self.cursor + self.rank * self.mb
        idx = self._permutation()[start : start + self.mb]
        idx = np.sort(idx if self.rows is None else self.rows[idx])  # sorted reads are faster on Arrow
        self.cursor += self.mb * self.world
        return torch.from_numpy(np.asarray(self.ds[idx]["input_ids"], dtype=np.int64)), idx

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world": self.world, "mb": self.mb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["world"], state["mb"]) != (self.world, self.mb):
            # Positions are counted in global sequences, so a different layout resumes at the same point.
            print(f"note: resuming data order with world x micro_batch {self.world}x{self.mb} "
                  f"(checkpoint had {state['world']}x{state['mb']})")
        self.epoch, self.cursor, self.seed, self._perm = state["epoch"], state["cursor"], state["seed"], None


def read_index(path: str | Path, n_rows: int, field: str) -> np.ndarray:
    """A selection index (index.npy of data_tools.select): sorted unique sequence indices within the split."""
    try:
        idx = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{field}={path}: cannot read a .npy index: {e}") from None
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (len(idx) and (idx.min() < 0 or idx.max() >= n_rows)):
        raise UserError(f"{field}={path}: expected a 1-D array of sequence indices in [0, {n_rows}), "
                        f"got shape {idx.shape}, dtype {idx.dtype}")
    return np.unique(idx)


def validation_batches(dataset, micro_batch: int, max_batches: int, rank: int, world: int) -> list[torch.Tensor]:
    """A fixed list of validation micro-batches for this rank (the first max_batches*world*B rows, strided)."""
    total = len(dataset) if max_batches < 0 else min(len(dataset), max_batches * micro_batch * world)
    rows = list(range(rank * micro_batch, total, micro_batch * world))
    return [torch.from_numpy(np.asarray(dataset[r : min(r + micro_batch, total)]["input_ids"], dtype=np.int64))
            for r in rows]
