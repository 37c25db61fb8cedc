"""`python -m data_tools.score CONFIG [overrides]`: score every packed sequence with the SLM in one forward pass.

Per sequence: mean and median token loss, SALT_DS (median loss over tokens whose target is in the SLM's top-k),
the learnable fraction, mean entropy, top-1 accuracy and `confident_wrong` (the share of positions where the SLM
is confident and wrong); with `ref_model`, also `ref_mean_loss`. Optionally
writes sparse soft labels (`cache.mode`) in the same pass.

Sharding: the split is cut into `num_shards` contiguous ranges of whole batches, so every sequence is scored in
the same batch whatever the shard count, and scores are identical. Under torchrun / the deepspeed launcher, rank
r of W scores shards r, r+W, ...; a plain process scores all shards, or only `shard=i` (SLURM arrays, then
`merge_only=true`). Each shard is written atomically with a DONE marker (the run's identity and the size of every
file); a relaunch skips finished shards, and scores again one whose files no longer match their sizes (damaged).

Output `out_dir/`: `scores/` (Arrow: `index` + score columns), `cache/` (if any), `manifest.json`, `shards/`. The
merge builds the new scores, cache and manifest next to the old ones and renames them in only when all are
written, so a failure (a full disk) leaves an earlier run's merged results whole. A plain process (no launcher)
holds a lock on `shards/.score.lock` while it works: a second process on the same out_dir is refused, naming the
first (`shard=` jobs share it with each other, not with a whole run).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data_tools.score_math import (
    DEFAULT_CONFIDENT,
    SCORE_COLUMNS,
    compiled_token_stats,
    score_logits,
    token_stats,
)
from data_tools.score_output import ScoreOutput, out_dir_lock
from data_tools.softlabels import (
    CacheConfig,
    bytes_per_position,
    sampled_labels,
    sequence_generator,
    top_k_labels,
)
from slm_assist.core import dist
from slm_assist.core.config import check, parse_cli
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.faults import fault
from slm_assist.core.files import check_writable
from slm_assist.core.model_dir import ModelDir, decoder_and_head
from slm_assist.core.selection import read_index
from slm_assist.core.soft_labels import SoftLabels

USAGE = "python -m data_tools.score CONFIG [key=value ...]"


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
    confident_threshold: float = DEFAULT_CONFIDENT
    """Confident Learning (Northcutt et al.): a token is flagged when the SLM's top-1 probability is at least this
    and the target is not its top-1; `confident_wrong` is the flagged share of a sequence's positions. In (0, 1]."""
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
    compile: bool | None = None
    """Compile the per-token statistics (fused reductions over each logits chunk); null = on CUDA only (on CPU
    it needs a C++ compiler and the eager version is the measured baseline)."""
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        check(self.topk > 0, "topk", self.topk, "> 0")
        check(0 < self.confident_threshold <= 1, "confident_threshold", self.confident_threshold, "in (0, 1]")
        check(self.batch_size > 0, "batch_size", self.batch_size, "> 0")
        check(self.num_shards == -1 or self.num_shards > 0, "num_shards", self.num_shards, "-1 or > 0")
        check(self.shard >= -1, "shard", self.shard, ">= -1")


def logit_chunks(model: torch.nn.Module, ids: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, logits [rows, T, V]) of `ids` [B, T], a few sequences at a time from one forward pass of the trunk:
    the output head runs per chunk, so the batch's [B, T, V] logits, the largest activation at a 32k+ vocabulary,
    never exist at once. Chunks: up to 1 GiB of fp32 logits on CUDA, 256 MiB on CPU (one head matmul for a whole
    small batch: per-sequence matmuls measured 16% slower for a 27M scorer). A model whose logits are more than
    the head of the last hidden state (soft-capping, scaling) runs whole."""
    split = decoder_and_head(model)
    if split is None:
        yield slice(None), model(input_ids=ids).logits
        return
    decoder, head = split
    hidden = decoder(input_ids=ids).last_hidden_state
    per_seq = ids.shape[1] * head.weight.shape[0] * 4
    step = max(1, (1 << (30 if ids.is_cuda else 28)) // per_seq)
    for s in range(0, ids.shape[0], step):
        rows = slice(s, min(s + step, ids.shape[0]))
        yield rows, head(hidden[rows])


def shard_rows(n_rows: int, batch_size: int, num_shards: int, shard: int) -> range:
    """Rows of shard `shard`: a contiguous range of whole batches (so batches never depend on the shard count)."""
    n_batches = -(-n_rows // batch_size)
    lo, hi = shard * n_batches // num_shards, (shard + 1) * n_batches // num_shards
    return range(lo * batch_size, min(hi * batch_size, n_rows))


class Scorer:
    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg
        self.data = PackedDataset.open(cfg.data)
        self.ds = self.data.split(cfg.split)
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.num_shards = cfg.num_shards if cfg.num_shards > 0 else self.world
        if cfg.shard >= self.num_shards:
            raise UserError(f"shard={cfg.shard} is out of range for num_shards={self.num_shards}")
        self.model_dir = ModelDir.open(cfg.model, "model")
        self.ref_dir = ModelDir.open(cfg.ref_model, "ref_model") if cfg.ref_model else None
        for d in (self.model_dir, self.ref_dir):  # every input checked before out_dir is touched
            if d is not None:
                d.check_vocabulary(self.data, "score with a model trained on this tokenizer")
                d.check_context(self.data.seq_len, "score sequences of the data's seq_len")
        self.stats = token_stats  # compiled by load_models where cfg.compile says
        self.cache_indices: set[int] | None = None
        if cfg.cache.mode != "none" and cfg.cache.indices:
            self.cache_indices = set(read_index(cfg.cache.indices, len(self.ds), "cache.indices").tolist())
        identity = {  # a shard made under any other identity must not be reused
            "model_fingerprint": self.model_dir.fingerprint(),
            "ref_model_fingerprint": self.ref_dir.fingerprint() if self.ref_dir else None,
            "dataset_fingerprint": self.data.fingerprint,
            "split": cfg.split, "topk": cfg.topk, "confident_threshold": cfg.confident_threshold, "dtype": cfg.dtype,
            "batch_size": cfg.batch_size, "num_shards": self.num_shards, "cache": asdict(cfg.cache),
            # the cached rows by content: cache.indices re-made at the same path is another run
            "cache_rows": None if self.cache_indices is None else hashlib.sha256(
                np.asarray(sorted(self.cache_indices), dtype=np.int64).tobytes()).hexdigest()[:16],
        }
        self.output = ScoreOutput(Path(cfg.out_dir), identity, self.num_shards, cfg.model, cfg.overwrite,
                                  separate_jobs=cfg.shard >= 0 or cfg.merge_only)

    def my_shards(self) -> list[int]:
        if self.cfg.shard >= 0:
            return [self.cfg.shard]
        return list(range(self.rank, self.num_shards, self.world))

    def run(self) -> None:
        from tqdm.auto import tqdm

        todo = []
        for i in self.my_shards():
            why = self.output.shard_problem(i)
            if why:
                print(f"{self.output.shard_dir(i)}: damaged, {why}; scoring it again", flush=True)
            if why is not None:
                todo.append(i)
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
        device = dist.device()
        dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        if self.cfg.compile if self.cfg.compile is not None else device.type == "cuda":
            self.stats = compiled_token_stats()

        def load(d: ModelDir) -> torch.nn.Module:
            return d.load(device, len(d.tokenizer), dtype=dtype).eval()

        return load(self.model_dir), (load(self.ref_dir) if self.ref_dir else None), device

    @torch.inference_mode()
    def score_shard(self, i: int, model, ref, device: torch.device, bar) -> None:
        cfg = self.cfg
        rows = shard_rows(len(self.ds), cfg.batch_size, self.num_shards, i)
        cols: dict[str, list[torch.Tensor]] = {c: [] for c in ("index", *SCORE_COLUMNS)}
        if ref is not None:
            cols["ref_mean_loss"] = []
        labels: list[SoftLabels] = []  # host records of the `cached` sequences, in order
        cached: list[int] = []
        for start in range(rows.start, rows.stop, cfg.batch_size):
            idx = np.arange(start, min(start + cfg.batch_size, rows.stop))
            ids = torch.from_numpy(np.asarray(self.ds[idx]["input_ids"], dtype=np.int64)).to(device)
            for rows_, logits in logit_chunks(model, ids):
                scores = score_logits(logits, ids[rows_], cfg.topk, confident=cfg.confident_threshold, stats=self.stats)
                for c, v in scores.items():
                    cols[c].append(v)  # stays on the device: one copy per shard, no sync per batch
                self._cache_batch(logits, idx[rows_], labels, cached)
            if ref is not None:
                cols["ref_mean_loss"] += [score_logits(logits, ids[rows_], cfg.topk, stats=self.stats)["mean_loss"]
                                          for rows_, logits in logit_chunks(ref, ids)]
            cols["index"].append(torch.from_numpy(idx))
            bar.update(len(idx))
        table = {c: torch.cat(v).cpu().numpy().astype(np.int64 if c == "index" else np.float32)
                 for c, v in cols.items()}
        self.output.write_shard(i, rows, table, labels, cached)
        fault("kill_after_shard", i)

    def _cache_batch(self, logits: torch.Tensor, idx: np.ndarray, labels: list[SoftLabels], cached: list[int]) -> None:
        mode = self.cfg.cache.mode
        if mode == "none":
            return
        keep = [r for r, j in enumerate(idx) if self.cache_indices is None or int(j) in self.cache_indices]
        if not keep:
            return
        if mode == "top_k" and logits.is_cuda:  # all kept rows at once on the device; [P, k] per row to the host
            labels.append(top_k_labels(logits[keep, :-1], self.cfg.cache.k))  # one record of len(keep) sequences
            cached += [int(idx[r]) for r in keep]
            return
        for r in keep:  # on CPU one sequence at a time: its vocabulary-sized intermediates stay in cache
            # sampled draws use a per-sequence CPU generator, so the cache does not depend on the device
            sub = logits[r, :-1] if mode == "top_k" else logits[r, :-1].cpu()
            if mode == "top_k":
                out = top_k_labels(sub, self.cfg.cache.k)
            else:
                out = sampled_labels(sub, self.cfg.cache.samples, sequence_generator(self.cfg.cache.seed, int(idx[r])))
            labels.append(out)
            cached.append(int(idx[r]))

    def merge(self) -> dict:
        """The shards merged into scores/ (and cache/) under a manifest that names what they were made from."""
        cfg = self.cfg
        about = {"data": str(cfg.data), "model": cfg.model, "ref_model": cfg.ref_model or None,
                 "num_sequences": len(self.ds)}
        return self.output.merge(about, bytes_per_position(cfg.cache) if cfg.cache.mode != "none" else None)


def main(argv: Sequence[str]) -> None:
    cfg = parse_cli(argv, ScoreConfig, USAGE, description=__doc__,
                    example="python -m data_tools.score configs/demo/score.yaml cache.mode=top_k cache.k=32")
    out = Path(cfg.out_dir)
    check_writable(out, "out_dir")
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if launched:
        dist.init()  # for the barriers around the shared output directory
    scorer = Scorer(cfg)  # reads and checks every input
    scorer.output.check()
    with contextlib.ExitStack() as lock:
        if not launched:  # under a launcher every rank writes out_dir, legitimately
            lock.enter_context(out_dir_lock(out, exclusive=cfg.shard < 0))
            scorer.output.check()  # again: a run that held the lock may have finished since the first check
        _score(cfg, scorer, out)


def _score(cfg: ScoreConfig, scorer: Scorer, out: Path) -> None:
    if dist.is_main() and cfg.overwrite and not cfg.merge_only and cfg.shard < 0:
        scorer.output.drop_other_shards()
    dist.barrier()
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
    run_cli(main)
