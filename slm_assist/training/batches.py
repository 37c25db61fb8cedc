"""What an objective is fed: `Batch`, and the streams of them over a packed split (a deterministic, resumable
order, sharded by data-parallel rank)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch

from slm_assist.core.config import PathSetting
from slm_assist.core.errors import UserError

_PIN = torch.cuda.is_available()  # page-locked host batches make the host-to-device copy asynchronous
PREFETCH = _PIN  # streams read ahead by default where there is a device to keep busy


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """`obj` with `fn` applied to every tensor in it, through nested dicts, lists, tuples and dataclass instances
    (e.g. soft-label records)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _map_tensors(fn, getattr(obj, f.name)) for f in fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    return obj


@dataclass
class DataConfig:
    path: PathSetting = "runs/demo/data"
    """A directory written by `python -m data_tools.pack` (manifest.json, tokenizer/, train/, validation/)."""
    seed: int = 0
    """Seeds the shuffle order; epoch e uses a permutation seeded by (seed, e)."""


@dataclass
class Batch:
    """One micro-batch. Position t predicts the target at t+1: `labels` when given, else the inputs themselves."""

    input_ids: torch.Tensor
    """[B, T] token ids."""
    index: np.ndarray | None = None
    """The sequences' row indices in their split (soft-label cache lookups); None when not from a split."""
    labels: torch.Tensor | None = None
    """[B, T] targets (None = input_ids: plain next-token prediction on packed text)."""
    loss_mask: torch.Tensor | None = None
    """[B, T] 1 where the token counts as a target, 0 where it does not (None = every token counts)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Tensors read with the batch for its objective (e.g. cached soft labels, `ShardedBatches.attach`)."""

    def to(self, device: torch.device) -> Batch:
        # non_blocking: a pinned batch (ShardedBatches pins on CUDA machines) copies while the host goes on
        move = {k: v.to(device, non_blocking=True) for k in ("input_ids", "labels", "loss_mask")
                if (v := getattr(self, k)) is not None}
        extras = _map_tensors(lambda v: v.to(device, non_blocking=True), self.extras)
        return replace(self, **move, extras=extras)

    def targets(self) -> torch.Tensor:
        """[B, T-1] next-token targets, aligned with the logits of positions 0..T-2."""
        return (self.input_ids if self.labels is None else self.labels)[:, 1:]


class ShardedBatches:
    """Micro-batches of `input_ids` for one data-parallel rank, in a seeded order that spans epochs.

    The whole state is (epoch, cursor): `cursor` counts sequences consumed by *all* ranks in the current epoch's
    permutation, so the same state resumes exactly, and rank r of W takes rows [cursor + r*B, cursor + (r+1)*B).
    The tail of an epoch that cannot fill a global batch is skipped. `rows` restricts the stream to a subset of
    the split (e.g. a data_tools.select index), shuffled the same way.

    `prefetch` (default: on CUDA machines) reads and pins the next micro-batch in a background thread while the
    current step runs, so the host never stalls the device between steps; the state counts only the batches
    handed out, so a checkpoint resumes at the same batch either way. `attach` (set before the first batch)
    adds host-side tensors to each batch in the same read, e.g. a KD source's cached soft labels.
    """

    def __init__(self, dataset, micro_batch: int, rank: int, world: int, seed: int,
                 rows: np.ndarray | None = None, prefetch: bool | None = None) -> None:
        self.ds, self.mb, self.rank, self.world, self.seed = dataset, micro_batch, rank, world, seed
        self.rows = rows
        self.n = len(dataset) if rows is None else len(rows)
        if self.n < micro_batch * world:
            what = "the training split" if rows is None else "the selected subset"
            raise UserError(f"{what} has {self.n} sequences, fewer than one global micro-batch "
                            f"(train.micro_batch_size={micro_batch} x {world} ranks)")
        self.epoch, self.cursor = 0, 0
        self._perms: dict[int, np.ndarray] = {}
        self.order_key: np.ndarray | None = None
        self.ordered_until = 0
        self.attach: Callable[[Batch], Batch] | None = None
        on = PREFETCH if prefetch is None else prefetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if on else None
        self._ahead: tuple[tuple[int, int], Future[Batch]] | None = None  # (state it was read for, the read)

    @property
    def prefetches(self) -> bool:
        return self._pool is not None

    def order_first(self, key: np.ndarray, sequences: int) -> None:
        """A curriculum: the stream's first `sequences` sequences (counted over all ranks and epochs) come in
        ascending `key` order (one value per sequence of the stream's split, NaN last) instead of shuffled; when
        they span several epochs, each epoch's part is ordered on its own. They are the same sequences the
        shuffle would draw, so the data seen is unchanged, only its order; the order is a function of (seed,
        epoch), so a run resumed with the same batch layout and length continues it exactly."""
        self.order_key = np.nan_to_num(np.asarray(key, dtype=np.float64), nan=np.inf)
        self.ordered_until = sequences
        self._reset()

    def _reset(self) -> None:
        """Forget cached permutations and the batch read ahead (the order or the position changed)."""
        self._perms = {}
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).numpy()
            per_epoch = self.n - self.n % (self.mb * self.world)  # the tail that cannot fill a batch is skipped
            ordered = min(per_epoch, max(0, self.ordered_until - epoch * per_epoch))
            if ordered:
                head = perm[:ordered]
                key = self.order_key[head if self.rows is None else self.rows[head]]
                perm = np.concatenate([head[np.lexsort((head, key))], perm[ordered:]])  # ties: by position
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # this epoch's and the next
            self._perms[epoch] = perm
        return self._perms[epoch]

    def _rows_at(self, epoch: int, cursor: int) -> tuple[np.ndarray, int, int]:
        """This rank's split indices of the micro-batch at state (epoch, cursor), and the state after it."""
        if cursor + self.mb * self.world > self.n:
            epoch, cursor = epoch + 1, 0
        start = cursor + self.rank * self.mb
        idx = self._permutation(epoch)[start : start + self.mb]
        idx = np.sort(idx if self.rows is None else self.rows[idx])  # sorted reads are faster on Arrow
        return idx, epoch, cursor + self.mb * self.world

    def _read(self, idx: np.ndarray) -> Batch:
        batch = Batch(torch.from_numpy(np.asarray(self.ds[idx]["input_ids"], dtype=np.int64)), index=idx)
        if self.attach is not None:
            batch = self.attach(batch)
        if _PIN:
            batch = replace(batch, input_ids=batch.input_ids.pin_memory(),
                            extras=_map_tensors(torch.Tensor.pin_memory, batch.extras))
        return batch

    def next(self) -> Batch:
        """The next micro-batch, with the split indices of its sequences (for soft-label cache lookups)."""
        state = (self.epoch, self.cursor)
        idx, self.epoch, self.cursor = self._rows_at(*state)
        ahead, self._ahead = self._ahead, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == state else None
        if batch is None or not np.array_equal(batch.index, idx):  # nothing read ahead, or not this batch
            batch = self._read(idx)
        if self._pool is not None:
            nxt = self._rows_at(self.epoch, self.cursor)[0]
            self._ahead = ((self.epoch, self.cursor), self._pool.submit(self._read, nxt))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world": self.world, "mb": self.mb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["world"], state["mb"]) != (self.world, self.mb):
            # Positions are counted in global sequences, so a different layout resumes at the same point.
            print(f"note: resuming data order with world x micro_batch {self.world}x{self.mb} "
                  f"(checkpoint had {state['world']}x{state['mb']})")
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self._reset()


def validation_batches(dataset, micro_batch: int, max_batches: int, rank: int, world: int) -> list[torch.Tensor]:
    """A fixed list of validation micro-batches for this rank (the first max_batches*world*B rows, strided)."""
    total = len(dataset) if max_batches < 0 else min(len(dataset), max_batches * micro_batch * world)
    rows = list(range(rank * micro_batch, total, micro_batch * world))
    return [torch.from_numpy(np.asarray(dataset[r : min(r + micro_batch, total)]["input_ids"], dtype=np.int64))
            for r in rows]
