"""Sparse SLM soft labels: written by `data_tools.score` in its forward pass, read by the trainer.

Two encodings per scored position (T-1 per sequence):
- `top_k`: the SLM's k most likely token ids (int32) and their log-probs (fp16), plus the leftover tail mass
  1 - sum(top-k probs) (fp32), so a KD loss can treat the tail as one bucket.
- `sampled`: n token ids drawn with replacement from the SLM's distribution and their log-probs (as in
  "Sparse Logit Sampling", arXiv 2503.16870). Each draw has weight 1/n, so sum_i w_i * 1[id_i = v] is an
  unbiased estimate of p(v): a KD loss built on it is unbiased in expectation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from slm_assist.config import check
from slm_assist.errors import UserError


@dataclass
class CacheConfig:
    mode: Literal["none", "top_k", "sampled"] = "none"
    """none = no cache; top_k or sampled (see module doc)."""
    k: int = 32
    """top_k: tokens kept per position."""
    samples: int = 32
    """sampled: draws per position."""
    indices: str = ""
    """A selection index (index.npy from data_tools.select): cache only those sequences ("" = all)."""
    seed: int = 0
    """sampled: seeds the draws (per sequence, so shards do not change them)."""

    def __post_init__(self) -> None:
        check(self.k > 0, "k", self.k, "> 0")
        check(self.samples > 0, "samples", self.samples, "> 0")


CACHE_INFO = "cache_info.json"


def write_cache(rows: dict[str, list[np.ndarray]], indices: list[int], mode: str, path: Path) -> None:
    """Save per-sequence label arrays ([P, width], or [P] for the tail) as an Arrow dataset plus shape info.
    Callers skip empty shards (nothing selected), so `indices` is never empty here."""
    import datasets
    import pyarrow as pa

    def col(arrays: list[np.ndarray], dtype) -> pa.Array:
        flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), arrays[0].size)

    table = {"index": pa.array(np.asarray(indices, dtype=np.int64)),
             "ids": col(rows["ids"], np.int32), "logprobs": col(rows["logprobs"], np.float16)}
    if mode == "top_k":
        table["tail"] = col(rows["tail"], np.float32)
    datasets.Dataset(pa.table(table)).save_to_disk(str(path))
    positions, width = rows["ids"][0].shape
    (path / CACHE_INFO).write_text(json.dumps({"mode": mode, "positions": positions, "width": width}))


def bytes_per_position(cfg: CacheConfig) -> int:
    if cfg.mode == "top_k":
        return cfg.k * (4 + 2) + 4
    if cfg.mode == "sampled":
        return cfg.samples * (4 + 2)
    return 0


def top_k_labels(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """[P, V] logits of one sequence -> ids [P, k] int32, logprobs [P, k] fp16, tail [P] fp32.
    The top-k runs on the logits' own dtype (same order as fp32), so no full log-softmax is materialised."""
    top, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    logp = top.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    tail = (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
    return {"ids": ids.int().numpy(), "logprobs": logp.half().numpy(), "tail": tail.numpy()}


def sampled_labels(logits: torch.Tensor, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    """[P, V] logits of one sequence -> n draws per position from softmax(logits): ids int32, log-probs fp16."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.multinomial(logp.exp(), n, replacement=True, generator=generator)
    return {"ids": ids.int().numpy(), "logprobs": logp.gather(-1, ids).half().numpy()}


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """Draws depend on (seed, sequence index) only, so sharding and batch size never change them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class SoftLabelCache:
    """Read the cache of a scoring run: `get(indices)` returns batched tensors for those sequences.

    top_k:   {"ids": [B, P, k] long, "logprobs": [B, P, k] float, "tail": [B, P] float}
    sampled: {"ids": [B, P, n] long, "logprobs": [B, P, n] float, "weights": [B, P, n] float (1/n each)}
    """

    def __init__(self, path: str | Path) -> None:
        import datasets

        path = Path(path)
        try:
            self.ds = datasets.load_from_disk(str(path)).with_format("numpy")
        except Exception as e:
            raise UserError(f"{path}: not a soft-label cache: {e}") from None
        info_path = path / CACHE_INFO
        if not info_path.is_file():
            raise UserError(f"{path}: no {CACHE_INFO}; not a soft-label cache written by data_tools.score")
        info = json.loads(info_path.read_text())
        self.mode, self.shape = info["mode"], (info["positions"], info["width"])
        idx = np.asarray(self.ds["index"])
        self.row_of = {int(i): r for r, i in enumerate(idx)}
        self.path = path

    def __len__(self) -> int:
        return len(self.row_of)

    def get(self, indices) -> dict[str, torch.Tensor]:
        try:
            rows = [self.row_of[int(i)] for i in indices]
        except KeyError as e:
            raise UserError(f"{self.path}: sequence {e.args[0]} is not in the soft-label cache "
                            "(it was cached for a selection; see cache.indices)") from None
        batch = self.ds[rows]
        shape = (len(rows), *self.shape)
        ids = torch.from_numpy(np.asarray(batch["ids"], dtype=np.int64).reshape(shape))
        out = {"ids": ids,
               "logprobs": torch.from_numpy(np.asarray(batch["logprobs"], dtype=np.float32).reshape(shape))}
        if self.mode == "top_k":
            out["tail"] = torch.from_numpy(np.asarray(batch["tail"], dtype=np.float32))
        else:
            out["weights"] = torch.full(ids.shape, 1.0 / ids.shape[-1])
        return out
