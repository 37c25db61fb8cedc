"""A scoring run's output (written by `data_tools.score`): the one place that opens it and checks what it was
made from, its soft-label cache included (opened through core/soft_labels.py, which owns the cache's format).

    <dir>/manifest.json   identity (model / dataset fingerprints, split, settings) + counts; written last
    <dir>/scores/         Arrow: `index` + one column per score
    <dir>/cache/          the soft-label cache (core/soft_labels.py): Arrow `index`, `ids`, `logprobs`, and `tail`
                          (top_k) + cache_info.json (mode, shape)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slm_assist.core.dataset import PackedDataset, load_arrow
from slm_assist.core.errors import UserError
from slm_assist.core.soft_labels import SoftLabelCache

MANIFEST = "manifest.json"
SCORES = "scores"
CACHE = "cache"


def is_scores_manifest(manifest: Any) -> bool:
    """Whether a parsed manifest.json is data_tools.score's (a packed dataset's has the same file name)."""
    return isinstance(manifest, dict) and "model_fingerprint" in manifest


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
