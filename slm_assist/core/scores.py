"""A scoring run's output (written by `data_tools.score`) and its sparse soft-label cache: the one place that
opens them and checks what they were made from.

    <dir>/manifest.json   identity (model / dataset fingerprints, split, settings) + counts; written last
    <dir>/scores/         Arrow: `index` + one column per score
    <dir>/cache/          Arrow: `index`, `ids`, `logprobs`, and `tail` (top_k) + cache_info.json (mode, shape)

Cache encodings per scored position (T-1 per sequence): `top_k` keeps the SLM's k most likely ids (int32), their
log-probs (fp16) and the leftover tail mass (fp32); `sampled` keeps n draws from the SLM's distribution with
their log-probs, each of weight 1/n (an unbiased estimate of the distribution).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError, brief

MANIFEST = "manifest.json"
SCORES = "scores"
CACHE = "cache"
CACHE_INFO = "cache_info.json"


def is_scores_manifest(manifest: Any) -> bool:
    """Whether a parsed manifest.json is data_tools.score's (a packed dataset's has the same file name)."""
    return isinstance(manifest, dict) and "model_fingerprint" in manifest


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


class ScoresDir:
    """An opened, finished scoring run. `field` names the setting that pointed here, for the errors."""

    def __init__(self, path: str | Path, field: str, manifest: dict[str, Any]) -> None:
        self.path, self.field, self.manifest = Path(path), field, manifest

    @classmethod
    def open(cls, path: str | Path, field: str) -> ScoresDir:
        d = Path(path)
        if not (d / MANIFEST).is_file():
            raise UserError(f"{field}={d}: no {MANIFEST}; not a finished data_tools.score output")
        try:
            manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{field}={d}: corrupt {MANIFEST}: {e}") from None
        if not is_scores_manifest(manifest) or not (d / SCORES).is_dir():
            raise UserError(f"{field}={d}: not a data_tools.score output (its {MANIFEST} is not a scoring "
                            f"manifest, or {SCORES}/ is missing); a packed dataset or model directory?")
        return cls(d, field, manifest)

    def columns(self) -> dict[str, np.ndarray]:
        """Every score column (and `index`) as numpy arrays."""
        ds = load_arrow(self.path / SCORES, f"{self.field}={self.path}",
                        "score the data again into it (python -m data_tools.score ... overwrite=true)")
        return {c: np.asarray(ds[c]) for c in ds.column_names}

    def dataset(self) -> PackedDataset:
        """The packed dataset these scores were made from (the manifest's `data`, `split`), checked by fingerprint:
        what the scored indices decode against."""
        m = self.manifest
        where = m.get("data")
        if not where:
            raise UserError(f"{self.field}={self.path}: its {MANIFEST} does not name the scored dataset")
        if not Path(where).is_dir():
            raise UserError(f"{self.field}={self.path}: the scored dataset {where} is no longer there (moved or deleted)")
        data = PackedDataset.open(where)
        if data.fingerprint != m.get("dataset_fingerprint"):
            raise UserError(f"{self.field}={self.path}: scored for dataset {m.get('dataset_fingerprint')}, but {where} "
                            f"now holds {data.fingerprint} (re-packed since); re-score it")
        return data

    def soft_labels(self, data: PackedDataset) -> SoftLabelCache:
        """The soft-label cache, which must have been made over exactly `data`'s train split."""
        cache_cfg = self.manifest.get("cache")
        no_cache = isinstance(cache_cfg, dict) and cache_cfg.get("mode") == "none"  # a cache/ left there is not ours
        if no_cache or not (self.path / CACHE).is_dir():
            raise UserError(f"{self.field}={self.path}: no finished data_tools.score output with a cache/ "
                            "(score with cache.mode=top_k or sampled)")
        self.check_train_split(data)
        return SoftLabelCache(self.path / CACHE)

    def check_train_split(self, data: PackedDataset) -> None:
        """These scores must have been made over exactly `data`'s train split (their indices are its rows)."""
        m = self.manifest
        if m.get("dataset_fingerprint") != data.fingerprint or m.get("split") != "train":
            raise UserError(f"{self.field}={self.path}: scored for dataset {m.get('dataset_fingerprint')} split "
                            f"{m.get('split')!r}, but this run trains on {data.fingerprint} 'train'")

    def train_column(self, name: str, data: PackedDataset) -> np.ndarray:
        """Score `name` for every row of `data`'s train split (NaN for rows that were not scored)."""
        self.check_train_split(data)
        cols = self.columns()
        if name not in cols:
            raise UserError(f"{self.field}={self.path}: no score column '{name}' (columns: {sorted(cols)})")
        out = np.full(len(data.split("train")), np.nan)
        out[cols["index"]] = cols[name]
        return out


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


class SoftLabelCache:
    """Read a soft-label cache: `get(indices)` returns batched tensors for those sequences.

    top_k:   {"ids": [B, P, k] long, "logprobs": [B, P, k] float, "tail": [B, P] float}
    sampled: {"ids": [B, P, n] long, "logprobs": [B, P, n] float, "weights": [B, P, n] float (1/n each)}
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        info_path = path / CACHE_INFO
        if not info_path.is_file():
            raise UserError(f"{path}: no {CACHE_INFO}; not a soft-label cache written by data_tools.score")
        remedy = "score the data again with the cache (python -m data_tools.score ... cache.mode=... overwrite=true)"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            self.mode, self.shape = info["mode"], (int(info["positions"]), int(info["width"]))
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

    def read(self, indices) -> dict[str, torch.Tensor]:
        """The labels of `indices` as stored (ids int32, logprobs fp16, tail fp32): the least to copy to a device,
        where `widen` upcasts them."""
        try:
            rows = [self.row_of[int(i)] for i in indices]
        except KeyError as e:
            raise UserError(f"{self.path}: sequence {e.args[0]} is not in the soft-label cache "
                            "(it was cached for a selection; see cache.indices)") from None
        batch = self.ds[rows]
        shape = (len(rows), *self.shape)
        out = {"ids": torch.from_numpy(np.asarray(batch["ids"], dtype=np.int32).reshape(shape)),
               "logprobs": torch.from_numpy(np.asarray(batch["logprobs"], dtype=np.float16).reshape(shape))}
        if self.mode == "top_k":
            out["tail"] = torch.from_numpy(np.asarray(batch["tail"], dtype=np.float32))
        return out

    def widen(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`read`'s labels in the loss's dtypes, on their device (see the class docstring)."""
        out = {"ids": stored["ids"].long(), "logprobs": stored["logprobs"].float()}
        if self.mode == "top_k":
            out["tail"] = stored["tail"].float()
        else:
            out["weights"] = torch.full(out["ids"].shape, 1.0 / out["ids"].shape[-1], device=out["ids"].device)
        return out

    def get(self, indices) -> dict[str, torch.Tensor]:
        return self.widen(self.read(indices))
