"""Sparse SLM soft labels: their typed records and their on-disk cache, in one place. `data_tools.softlabels`
computes the records from logits, `write_cache` saves them (a shard of `data_tools.score`), `SoftLabelCache` reads
them back for KD (core/scores.py's `ScoresDir.soft_labels` opens it), and kd/ takes the records by type.

Two kinds per scored position (T-1 per sequence):
- `TopKLabels` (cache.mode=top_k): the SLM's k most likely token ids and their log-probs, plus the leftover tail
  mass 1 - sum(top-k probs), so a KD loss can treat the tail as one bucket.
- `SampledLabels` (cache.mode=sampled): n token ids drawn with replacement from the SLM's distribution and their
  log-probs (as in "Sparse Logit Sampling", arXiv 2503.16870). Each draw has the implied weight 1/n, so
  sum_i w_i * 1[id_i = v] is an unbiased estimate of p(v): a KD loss built on it is unbiased in expectation.

A record holds tensors [..., P, width] (the tail [..., P]) in one of two sets of dtypes: as stored (ids int32,
logprobs fp16, tail fp32: what is written, read, pinned and copied to a device) or, after `widen` on the
device, in the loss's (ids int64, logprobs and tail fp32).

The cache on disk (a scoring run's cache/, and each of its shards'): an Arrow dataset with one row per sequence,
`index` (int64) and one fixed-size list column per field, in the stored dtypes, holding the sequence's values
flattened (`ids`, `logprobs`, and `tail` for top_k); plus cache_info.json {"mode", "positions", "width"}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import numpy as np
import torch

from slm_assist.core.dataset import load_arrow
from slm_assist.core.errors import UserError, brief

CACHE_INFO = "cache_info.json"
"""Next to the cache's Arrow files: its mode and the [positions, width] of every sequence's labels."""

Mode = Literal["top_k", "sampled"]
L = TypeVar("L", bound="SoftLabels")


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


@dataclass(frozen=True)
class SoftLabels:
    """The fields both kinds share; a record is a `TopKLabels` or a `SampledLabels`."""

    ids: torch.Tensor
    """[..., P, width] token ids."""
    logprobs: torch.Tensor
    """[..., P, width] their log-probabilities under the SLM (-inf: an unused slot of a merged record)."""

    mode: ClassVar[Mode]
    """The kind's name: the `cache.mode` that writes it, cache_info.json's `mode`."""
    STORED: ClassVar[dict[str, torch.dtype]] = {"ids": torch.int32, "logprobs": torch.float16}
    """Every field's dtype on disk and on the host (in the field order of the Arrow columns)."""
    WIDE: ClassVar[dict[str, torch.dtype]] = {"ids": torch.int64, "logprobs": torch.float32}
    """Every field's dtype in the loss."""
    PER_POSITION: ClassVar[frozenset[str]] = frozenset()
    """Fields with one value per position ([..., P]) rather than one per slot ([..., P, width])."""

    @property
    def positions(self) -> int:
        return self.ids.shape[-2]

    @property
    def width(self) -> int:
        """k (top_k) or n (sampled): slots per position."""
        return self.ids.shape[-1]

    @classmethod
    def bytes_per_position(cls, width: int) -> int:
        """Stored bytes per scored position of a record `width` slots wide."""
        return sum(d.itemsize * (1 if f in cls.PER_POSITION else width) for f, d in cls.STORED.items())

    def map(self: L, fn: Callable[[torch.Tensor], torch.Tensor]) -> L:
        """The record with `fn` applied to every field."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def stored(self: L) -> L:
        """In the stored dtypes, on the record's device (cast before a copy to the host: less to copy)."""
        return replace(self, **{f: getattr(self, f).to(d) for f, d in self.STORED.items()})

    def widen(self: L) -> L:
        """In the loss's dtypes, on the record's device (upcast after the copy: less to copy)."""
        return replace(self, **{f: getattr(self, f).to(d) for f, d in self.WIDE.items()})

    def to(self: L, device: torch.device | str, non_blocking: bool = False) -> L:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: L) -> L:
        return self.map(torch.Tensor.pin_memory)


@dataclass(frozen=True)
class TopKLabels(SoftLabels):
    """The SLM's k most likely ids per position (sorted by probability), their log-probs and the tail mass."""

    tail: torch.Tensor
    """[..., P] 1 - the summed probability of the ids: the mass outside them, as one bucket."""

    mode: ClassVar[Mode] = "top_k"
    STORED: ClassVar[dict[str, torch.dtype]] = {**SoftLabels.STORED, "tail": torch.float32}
    WIDE: ClassVar[dict[str, torch.dtype]] = {**SoftLabels.WIDE, "tail": torch.float32}
    PER_POSITION: ClassVar[frozenset[str]] = frozenset({"tail"})


@dataclass(frozen=True)
class SampledLabels(SoftLabels):
    """n draws per position from the SLM's distribution and their log-probs, each of weight 1/n."""

    mode: ClassVar[Mode] = "sampled"

    @property
    def weights(self) -> torch.Tensor:
        """[..., P, n] the draws' weights, 1/n each (fp32, on the record's device): implied, never stored."""
        return torch.full(self.ids.shape, 1.0 / self.ids.shape[-1], device=self.ids.device)


RECORDS: dict[str, type[SoftLabels]] = {r.mode: r for r in (TopKLabels, SampledLabels)}
"""The record type of each cache mode."""


def write_cache(labels: Sequence[SoftLabels], indices: Sequence[int], path: Path) -> None:
    """Save the host records of the sequences `indices` (in order; a record holds one sequence, [P, width], or
    several, [m, P, width], all of one kind) as a cache in the new directory `path`: the Arrow dataset plus
    cache_info.json. Callers skip empty shards (nothing cached), so `indices` is never empty here."""
    import datasets
    import pyarrow as pa

    kind = type(labels[0])
    if any(type(x) is not kind for x in labels):
        raise TypeError(f"write_cache: records of more than one kind ({sorted({type(x).__name__ for x in labels})})")
    positions, width = labels[0].ids.shape[-2:]

    def col(name: str, dtype: torch.dtype) -> pa.Array:
        flat = np.concatenate([getattr(x, name).numpy().reshape(-1) for x in labels]).astype(_numpy_dtype(dtype),
                                                                                             copy=False)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), positions * (1 if name in kind.PER_POSITION
                                                                              else width))

    table = {"index": pa.array(np.asarray(indices, dtype=np.int64)),
             **{name: col(name, dtype) for name, dtype in kind.STORED.items()}}
    datasets.Dataset(pa.table(table)).save_to_disk(str(path))
    (path / CACHE_INFO).write_text(json.dumps({"mode": kind.mode, "positions": positions, "width": width}))


class SoftLabelCache:
    """A soft-label cache opened for reading: `read(indices)` returns those sequences' labels as one record of
    batched tensors ([B, P, width], the tail [B, P]) in the stored dtypes, `get` the same widened. `mode` names
    its kind, `record` is its record type (`TopKLabels` or `SampledLabels`), `shape` is (positions, width)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        info_path = path / CACHE_INFO
        if not info_path.is_file():
            raise UserError(f"{path}: no {CACHE_INFO}; not a soft-label cache written by data_tools.score")
        remedy = "score the data again with the cache (python -m data_tools.score ... cache.mode=... overwrite=true)"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            self.mode, self.shape = info["mode"], (int(info["positions"]), int(info["width"]))
            self.record: type[SoftLabels] = RECORDS[self.mode]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"soft-label cache {path}: {info_path} is damaged and cannot be read ({brief(e)}); "
                            f"{remedy}") from None
        self.ds = load_arrow(path, f"soft-label cache {path}", remedy).with_format("numpy")
        self.index = np.asarray(self.ds["index"])
        self.row_of = {int(i): r for r, i in enumerate(self.index)}
        self.path = path

    def __len__(self) -> int:
        return len(self.row_of)

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of `indices` (sequence indices into the train split) that have no cached labels."""
        return np.setdiff1d(np.asarray(indices, dtype=np.int64), self.index)

    def read(self, indices) -> SoftLabels:
        """The labels of `indices` as stored (host tensors over the Arrow data, not copied again): the least to
        copy to a device, where `widen` upcasts them."""
        try:
            rows = [self.row_of[int(i)] for i in indices]
        except KeyError as e:
            raise UserError(f"{self.path}: sequence {e.args[0]} is not in the soft-label cache "
                            "(it was cached for a selection; see cache.indices)") from None
        batch = self.ds[rows]
        shape = (len(rows), *self.shape)
        return self.record(**{
            name: torch.from_numpy(np.asarray(batch[name], dtype=_numpy_dtype(dtype))
                                   .reshape(shape[:-1] if name in self.record.PER_POSITION else shape))
            for name, dtype in self.record.STORED.items()})

    def get(self, indices) -> SoftLabels:
        """`read`, widened to the loss's dtypes."""
        return self.read(indices).widen()
