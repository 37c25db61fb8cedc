"""`python -m data_tools.score CONFIG [overrides]`: score every packed sequence with the SLM in one forward pass.

Per sequence: mean and median token loss, SALT_DS (median loss over tokens whose target is in the SLM's top-k),
the learnable fraction, mean entropy and top-1 accuracy; with `ref_model`, also `ref_mean_loss`. Optionally
writes sparse soft labels (`cache.mode`) in the same pass.

Sharding: the split is cut into `num_shards` contiguous ranges of whole batches, so every sequence is scored in
the same batch whatever the shard count, and scores are identical. Under torchrun / the deepspeed launcher, rank
r of W scores shards r, r+W, ...; a plain process scores all shards, or only `shard=i` (SLURM arrays, then
`merge_only=true`). Each shard is written atomically with a DONE marker; a relaunch skips finished shards.

Output `out_dir/`: `scores/` (Arrow: `index` + score columns), `cache/` (if any), `manifest.json`, `shards/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data_tools.scoring import SCORE_COLUMNS, score_logits
from data_tools.softlabels import (
    CACHE_INFO,
    CacheConfig,
    bytes_per_position,
    sampled_labels,
    sequence_generator,
    top_k_labels,
    write_cache,
)
from slm_assist.config import check, load_config, split_argv
from slm_assist.errors import UserError
from slm_assist.fsutil import atomic_output_dir, atomic_write_text

USAGE = "python -m data_tools.score CONFIG [key=value ...]"
FAULT_ENV = "SLM_ASSIST_FAULT"  # "kill_after_shard:N": SIGKILL once shard N is committed (resume tests)


@dataclass
class ScoreConfig:
    model: str = "runs/demo/slm/final"
    """The scoring SLM: a save_pretrained directory that includes its tokenizer."""
    ref_model: str = ""
    """Optional reference model directory; adds ref_mean_loss (difference / excess-loss selection)."""
    data: str = "runs/demo/data"
    """A packed dataset directory (data_tools.pack)."""
    split: str = "train"
    out_dir: str = "runs/demo/scores"
    overwrite: bool = False
    topk: int = 10
    """A token is "learnable" when its target is among the SLM's top-k (SALT_DS)."""
    batch_size: int = 16
    dtype: Literal["bf16", "fp32"] = "bf16"
    num_shards: int = -1
    """-1 = one shard per process (WORLD_SIZE under a launcher, else 1)."""
    shard: int = -1
    """Score only this shard (independent jobs); -1 = every shard this process owns."""
    merge_only: bool = False
    """Only check that every shard is done and merge them."""
    torch_threads: int = 0
    """CPU threads (0 = torch's default)."""
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        check(self.topk > 0, "topk", self.topk, "> 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "> 0")
        check(self.num_shards == -1 or self.num_shards > 0, "num_shards", self.num_shards, "-1 or > 0")
        check(self.shard >= -1, "shard", self.shard, ">= -1")


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a save_pretrained directory's config and weight files."""
    d = Path(model_dir)
    files = [d / "config.json", *d.glob("*.safetensors"), *d.glob("*.bin")]
    return _digest([f for f in files if f.is_file()])


def shard_rows(n_rows: int, batch_size: int, num_shards: int, shard: int) -> range:
    """Rows of shard `shard`: a contiguous range of whole batches (so batches never depend on the shard count)."""
    n_batches = -(-n_rows // batch_size)
    lo, hi = shard * n_batches // num_shards, (shard + 1) * n_batches // num_shards
    return range(lo * batch_size, min(hi * batch_size, n_rows))


def _load_scorer(path: str, dataset_fp: str, device: torch.device, dtype: torch.dtype, role: str):
    from data_tools.tokenizer import load_tokenizer, tokenizer_fingerprint
    from slm_assist.models import ModelConfig, build_model

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise UserError(f"{role}={path}: no tokenizer files next to the model; cannot check it shares the "
                        "dataset's vocabulary (save the tokenizer into the model directory)")
    tok = load_tokenizer(path)
    if tokenizer_fingerprint(tok) != dataset_fp:
        raise UserError(f"{role}={path}: tokenizer fingerprint {tokenizer_fingerprint(tok)} differs from the "
                        f"dataset manifest's {dataset_fp}; score with a model trained on this tokenizer")
    model = build_model(ModelConfig(pretrained=path), tok, device, dtype=dtype)
    return model.eval()


class Scorer:
    def __init__(self, cfg: ScoreConfig) -> None:
        from data_tools.pack import dataset_fingerprint, read_manifest
        from slm_assist.data import load_split, read_index

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.data_manifest = read_manifest(cfg.data)
        if cfg.split not in self.data_manifest["splits"]:
            raise UserError(f"split={cfg.split!r} not in {cfg.data} (splits: {list(self.data_manifest['splits'])})")
        self.ds = load_split(cfg.data, cfg.split)
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.num_shards = cfg.num_shards if cfg.num_shards > 0 else self.world
        if cfg.shard >= self.num_shards:
            raise UserError(f"shard={cfg.shard} is out of range for num_shards={self.num_shards}")
        for role, path in (("model", cfg.model), ("ref_model", cfg.ref_model)):
            if path and not (Path(path) / "config.json").is_file():
                raise UserError(f"{role}={path}: not a save_pretrained model directory (no config.json)")
        self.cache_indices: set[int] | None = None
        if cfg.cache.mode != "none" and cfg.cache.indices:
            self.cache_indices = set(read_index(cfg.cache.indices, len(self.ds), "cache.indices").tolist())
        self.identity = {  # a shard made under any other identity must not be reused
            "model_fingerprint": model_fingerprint(cfg.model),
            "ref_model_fingerprint": model_fingerprint(cfg.ref_model) if cfg.ref_model else None,
            "dataset_fingerprint": dataset_fingerprint(self.data_manifest),
            "split": cfg.split, "topk": cfg.topk, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
            "num_shards": self.num_shards, "cache": asdict(cfg.cache),
        }

    # ---- shards ------------------------------------------------------------------------------------------
    def shard_dir(self, i: int) -> Path:
        return self.out / "shards" / f"shard_{i:05d}-of-{self.num_shards:05d}"

    def is_done(self, i: int) -> bool:
        marker = self.shard_dir(i) / "DONE"
        if not marker.is_file():
            return False
        if json.loads(marker.read_text())["identity"] != self.identity:
            raise UserError(f"{self.shard_dir(i)} was scored with another model, data or settings; "
                            "set overwrite=true or use another out_dir")
        return True

    def my_shards(self) -> list[int]:
        if self.cfg.shard >= 0:
            return [self.cfg.shard]
        return list(range(self.rank, self.num_shards, self.world))

    def run(self) -> None:
        from tqdm.auto import tqdm

        todo = [i for i in self.my_shards() if not self.is_done(i)]
        skipped = len(self.my_shards()) - len(todo)
        if skipped and self.rank == 0:
            print(f"skipping {skipped} finished shard(s)")
        if not todo:
            return
        model, ref, device = self.load_models()
        total = sum(len(shard_rows(len(self.ds), self.cfg.batch_size, self.num_shards, i)) for i in todo)
        with tqdm(total=total, desc=f"score[{self.rank}]", unit="seq", disable=self.rank != 0) as bar:
            for i in todo:
                self.score_shard(i, model, ref, device, bar)

    def load_models(self) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.device]:
        """The scoring model and optional reference, frozen, after checking they share the data's tokenizer."""
        if self.cfg.torch_threads > 0:
            torch.set_num_threads(self.cfg.torch_threads)
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        fp = self.data_manifest["tokenizer_fingerprint"]
        model = _load_scorer(self.cfg.model, fp, device, dtype, "model")
        ref = _load_scorer(self.cfg.ref_model, fp, device, dtype, "ref_model") if self.cfg.ref_model else None
        return model, ref, device

    @torch.inference_mode()
    def score_shard(self, i: int, model, ref, device: torch.device, bar) -> None:
        cfg = self.cfg
        rows = shard_rows(len(self.ds), cfg.batch_size, self.num_shards, i)
        cols: dict[str, list[torch.Tensor]] = {c: [] for c in ("index", *SCORE_COLUMNS)}
        if ref is not None:
            cols["ref_mean_loss"] = []
        labels: dict[str, list[np.ndarray]] = {"ids": [], "logprobs": [], "tail": []}
        cached: list[int] = []
        for start in range(rows.start, rows.stop, cfg.batch_size):
            idx = np.arange(start, min(start + cfg.batch_size, rows.stop))
            ids = torch.from_numpy(np.asarray(self.ds[idx]["input_ids"], dtype=np.int64)).to(device)
            logits = model(input_ids=ids).logits
            for c, v in score_logits(logits, ids, cfg.topk).items():
                cols[c].append(v)  # stays on the device: one copy per shard, no sync per batch
            if ref is not None:
                cols["ref_mean_loss"].append(score_logits(ref(input_ids=ids).logits, ids, cfg.topk)["mean_loss"])
            cols["index"].append(torch.from_numpy(idx))
            self._cache_batch(logits, idx, labels, cached)
            bar.update(len(idx))
        with atomic_output_dir(self.shard_dir(i), overwrite=True) as tmp:
            import datasets

            table = {c: torch.cat(v).cpu().numpy().astype(np.int64 if c == "index" else np.float32)
                     for c, v in cols.items()}
            datasets.Dataset.from_dict(table).save_to_disk(str(tmp / "scores"))
            if cached:
                write_cache(labels, cached, cfg.cache.mode, tmp / "cache")
            (tmp / "DONE").write_text(json.dumps({"identity": self.identity, "rows": [rows.start, rows.stop],
                                                  "cached": len(cached), "time": time.time()}))
        if os.environ.get(FAULT_ENV) == f"kill_after_shard:{i}":
            os.kill(os.getpid(), signal.SIGKILL)

    def _cache_batch(self, logits: torch.Tensor, idx: np.ndarray, labels: dict, cached: list[int]) -> None:
        mode = self.cfg.cache.mode
        if mode == "none":
            return
        keep = [r for r, j in enumerate(idx) if self.cache_indices is None or int(j) in self.cache_indices]
        if not keep:
            return
        for r in keep:  # one sequence at a time: its vocabulary-sized intermediates stay in cache
            sub = logits[r, :-1].cpu()
            if mode == "top_k":
                out = top_k_labels(sub, self.cfg.cache.k)
            else:
                out = sampled_labels(sub, self.cfg.cache.samples, sequence_generator(self.cfg.cache.seed, int(idx[r])))
            for key, arr in out.items():
                labels[key].append(arr)
            cached.append(int(idx[r]))

    # ---- merge -------------------------------------------------------------------------------------------
    def merge(self) -> dict:
        import datasets

        missing = [i for i in range(self.num_shards) if not self.is_done(i)]
        if missing:
            raise UserError(f"{self.out}: cannot merge, {len(missing)} of {self.num_shards} shards are not done "
                            f"(missing: {missing[:20]}); run them first (shard=i) or relaunch without shard=")
        dirs = [self.shard_dir(i) for i in range(self.num_shards)]
        manifest = {"format_version": 1, **self.identity, "data": str(self.cfg.data), "model": self.cfg.model,
                    "ref_model": self.cfg.ref_model or None, "num_sequences": len(self.ds),
                    "columns": [c for c in datasets.load_from_disk(str(dirs[0] / "scores")).column_names]}
        for name in ("scores", "cache"):
            parts = [datasets.load_from_disk(str(d / name)) for d in dirs if (d / name).is_dir()]
            if not parts:
                continue
            with atomic_output_dir(self.out / name, overwrite=True) as tmp:
                datasets.concatenate_datasets(parts).save_to_disk(str(tmp))
                if name == "cache":
                    src = next(d / name for d in dirs if (d / name).is_dir())
                    (tmp / CACHE_INFO).write_text((src / CACHE_INFO).read_text())
        if self.cfg.cache.mode != "none":
            n_cached = sum(json.loads((d / "DONE").read_text())["cached"] for d in dirs)
            manifest["cache"].update(sequences_cached=n_cached,
                                     bytes_per_token=bytes_per_position(self.cfg.cache))
        atomic_write_text(self.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(self.out / "shards")  # merged copies exist now; the manifest marks the result complete
        return manifest


def main(argv: Sequence[str]) -> None:
    from slm_assist import dist

    path, overrides = split_argv(argv, USAGE)
    cfg = load_config(ScoreConfig, path, overrides)
    out = Path(cfg.out_dir)
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if launched:
        dist.init()  # for the barriers around the shared output directory
    if dist.is_main() and not cfg.merge_only and cfg.shard < 0:
        if cfg.overwrite:
            shutil.rmtree(out, ignore_errors=True)
        elif (out / "manifest.json").is_file():
            raise UserError(f"{out} already holds merged scores; set overwrite=true to score again")
    dist.barrier()
    scorer = Scorer(cfg)
    if not cfg.merge_only:
        scorer.run()
    if cfg.shard >= 0:
        print(f"shard {cfg.shard} done; when all are, merge with: python -m data_tools.score CONFIG merge_only=true")
        return
    dist.barrier()
    if not dist.is_main():
        return
    manifest = scorer.merge()
    print(f"scores: {out / 'scores'} ({manifest['num_sequences']} sequences, columns {manifest['columns']})")
    if "sequences_cached" in manifest["cache"]:
        print(f"cache: {out / 'cache'} ({manifest['cache']['sequences_cached']} sequences, "
              f"{manifest['cache']['bytes_per_token']} bytes/token)")


if __name__ == "__main__":
    from slm_assist.errors import run_cli

    run_cli(main)
