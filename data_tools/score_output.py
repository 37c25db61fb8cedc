"""The output directory of `data_tools.score`: its shards, their DONE markers, the lock and the merge.

    out_dir/shards/shard_IIIII-of-NNNNN/   scores/, cache/ (if any), DONE: the run's identity, the shard's rows, how
                                           many sequences it cached and the size of every file it holds
    out_dir/shards/.score.lock             held by a plain process while it works
    out_dir/scores/, cache/, manifest.json the merged results (core/scores.py, core/soft_labels.py read them); the
                                           manifest last

A shard is done when its DONE marker is this run's and every file it lists still has its size; one whose files do
not (a full disk, an interrupted copy) is damaged and scored again. A finished shard of another scoring run is an
error unless overwrite=true. The merge writes everything new next to the old results and renames it in only when
all is written; a full disk leaves the old merged results, and the finished shards, as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slm_assist.core.config import record_diff
from slm_assist.core.dataset import ARROW_FILES, load_arrow
from slm_assist.core.errors import UserError, brief
from slm_assist.core.files import (
    LockBusy,
    NoSpaceError,
    atomic_output_dir,
    atomic_write_text,
    lock_file,
    no_space_error,
    out_of_space,
    remove_output,
)
from slm_assist.core.scores import CACHE, MANIFEST, SCORES, is_scores_manifest
from slm_assist.core.soft_labels import CACHE_INFO, SoftLabels, write_cache

SHARD_FILES = (SCORES, CACHE, "DONE")
"""What a shard directory (out_dir/shards/shard_*) holds."""
SHARDS = "shards"
LOCK = ".score.lock"
"""In out_dir/shards: held (flock) by a plain process for its whole run; removed when it ends."""
MERGED = (*ARROW_FILES, CACHE_INFO)
"""What out_dir/scores and out_dir/cache hold."""


class ScoreOutput:
    """out_dir of one scoring run. `identity`: what its shards are made from (a shard made under any other is not
    reused); `model`: the scoring model's path, for the messages; `overwrite`: shards of another run may go;
    `separate_jobs`: this process is one of several independent jobs (shard= or merge_only=), for the messages."""

    def __init__(self, out: Path, identity: dict[str, Any], num_shards: int, model: str, overwrite: bool,
                 separate_jobs: bool) -> None:
        self.out, self.identity, self.num_shards = Path(out), identity, num_shards
        self.model, self.overwrite, self.separate_jobs = model, overwrite, separate_jobs

    def check(self) -> None:
        """Every rank, every mode, before any work: out_dir's manifest, if any, is a scoring one, and a finished
        output needs overwrite=true (old merged results stay until the new merge replaces them). Score writes
        only its own names there (scores/, cache/, manifest.json, shards/): a model folder may live next to them."""
        manifest = self.out / MANIFEST
        if not manifest.is_file():
            return
        try:
            ours = is_scores_manifest(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise UserError(f"{manifest}: not readable JSON: {e}") from None
        if not ours:
            raise UserError(f"out_dir={self.out}: its {MANIFEST} is not a data_tools.score manifest (a packed "
                            "dataset?); choose another out_dir")
        if not self.overwrite:
            raise UserError(f"out_dir={self.out} already holds merged scores; set overwrite=true to score again")

    # ---- shards ------------------------------------------------------------------------------------------
    def shard_dir(self, i: int) -> Path:
        return self.out / SHARDS / f"shard_{i:05d}-of-{self.num_shards:05d}"

    def shard_problem(self, i: int) -> str | None:
        """None when shard i is done: its DONE marker is this run's, and every file it lists has the size it was
        written with. Otherwise why not: "" when it was never finished, else what is damaged (a file cut short by
        a full disk or an interrupted copy): such a shard is scored again, since it is ours and made the same way
        from inputs already checked, and nothing else could repair it. A shard of another scoring run is an error
        (or, with overwrite=true, not done)."""
        d = self.shard_dir(i)
        marker = d / "DONE"
        if not marker.is_file():
            return ""
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"its DONE marker does not read back ({brief(e)})"
        if not isinstance(done, dict):
            return "its DONE marker is not a JSON object"
        if done.get("identity") != self.identity:
            if self.overwrite:  # this shard is ours to redo (every job owns its shards)
                remove_output(d, SHARD_FILES)
                return ""
            raise self.other_run_error(d, done)
        files = done.get("files")
        if not isinstance(files, dict):  # written before the sizes were recorded: read the Arrow data back
            import datasets

            for name in (SCORES, CACHE):
                if (d / name).is_dir():
                    try:
                        datasets.load_from_disk(str(d / name))
                    except Exception as e:  # pyarrow's OSError for a file cut short, a missing file, bad JSON
                        return f"{name}/ does not read back ({brief(e)})"
            return None
        for rel, size in files.items():
            try:
                actual = (d / rel).stat().st_size
            except OSError:
                return f"{rel} is missing"
            if actual != size:
                return f"{rel} has {actual} bytes, {size} when it was written"
        return None

    def other_run_error(self, d: Path, done: dict) -> UserError:
        """A finished shard made under another identity: what differs (e.g. `topk: 5 there, 10 here`; the model
        paths too when the model differs), and what to do."""
        there, here = done.get("identity"), self.identity
        if not isinstance(there, dict):
            diff = "its DONE marker records no identity"
        else:
            if there.get("model_fingerprint") != here["model_fingerprint"]:
                there, here = {**there, "model": done.get("model")}, {**here, "model": self.model}
            lines = record_diff(there, here)
            diff = "; ".join(lines[:4]) + ("; ..." if len(lines) > 4 else "") if lines else "other settings"
        if self.separate_jobs:
            what = f"{d} was scored by another scoring run"
        else:
            what = f"out_dir={self.out} holds finished shards of another scoring run that was not merged"
        return UserError(f"{what} ({diff}); set overwrite=true to score again over them, or choose another out_dir")

    def drop_other_shards(self) -> None:
        """overwrite=true (rank 0): shards made under another identity go; this run's own finished shards stay,
        so a killed overwrite resumes like any other run."""
        for d in sorted((self.out / SHARDS).glob("shard_*")):
            try:
                same = json.loads((d / "DONE").read_text(encoding="utf-8")).get("identity") == self.identity
            except (OSError, ValueError, AttributeError):  # unfinished or damaged
                same = False
            if not same:
                remove_output(d, SHARD_FILES)

    def write_shard(self, i: int, rows: range, table: dict[str, np.ndarray], labels: list[SoftLabels],
                    cached: list[int]) -> None:
        """Shard i, atomically: its scores (`table`: `index` + score columns), the soft labels of the `cached`
        sequences (if any; `labels`: their host records, in order), and last its DONE marker."""
        with atomic_output_dir(self.shard_dir(i), SHARD_FILES, overwrite=True, field="shard") as tmp:
            try:
                self._write_shard(tmp, rows, table, labels, cached)
            except BaseException as e:
                if out_of_space(e, tmp):  # before atomic_output_dir removes the partial shard
                    what = f"shard {i} of {self.num_shards}" + (" (scores and soft-label cache)" if cached else "")
                    raise no_space_error(self.out / SHARDS, what, self.kept()) from None
                raise

    def _write_shard(self, tmp: Path, rows: range, table: dict, labels: list[SoftLabels], cached: list[int]) -> None:
        import datasets

        datasets.Dataset.from_dict(table).save_to_disk(str(tmp / SCORES))
        if cached:
            write_cache(labels, cached, tmp / CACHE)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "DONE").write_text(json.dumps({"identity": self.identity, "model": self.model,
                                              "rows": [rows.start, rows.stop], "cached": len(cached),
                                              "files": files, "time": time.time()}))

    def kept(self) -> str:
        """What a failed write kept: the merged results of an earlier run, and this run's finished shards."""
        merged = (f"the merged scores in {self.out} were left as they were, and " if (self.out / MANIFEST).is_file()
                  else "")
        return f"{merged}finished shards are kept (the same command goes on from them)"

    # ---- merge -------------------------------------------------------------------------------------------
    def merge(self, about: dict[str, Any], bytes_per_token: float | None = None) -> dict:
        """Concatenate the shards into scores/ (and cache/) and write the manifest: the identity, `about` (data,
        model, ref_model, num_sequences), the columns and, with a cache, `bytes_per_token` and how many sequences
        it holds. Everything new is written under temp names first; only then are the old results replaced, by
        renames: a failure before (a full disk) leaves them as they were, and the shards stay for the next try."""
        import datasets

        problems = {i: self.shard_problem(i) for i in range(self.num_shards)}
        missing = [i for i, why in problems.items() if why is not None]
        if missing:
            damaged = "".join(f"; shard {i} is damaged: {why}" for i, why in problems.items() if why)
            if self.separate_jobs:
                todo = "score them first (shard=i), or relaunch without shard= to score them in one process"
            else:
                todo = f"another process changed {self.out / SHARDS} while this one ran; run the same command again"
            raise UserError(f"{self.out}: cannot merge, {len(missing)} of {self.num_shards} shards are not done "
                            f"(missing: {missing[:20]}){damaged}; {todo}")
        dirs = [self.shard_dir(i) for i in range(self.num_shards)]
        parts = {name: [load_arrow(d / name, f"shard {d}", "delete that shard directory and run the same command "
                                   "again") for d in dirs if (d / name).is_dir()] for name in (SCORES, CACHE)}
        manifest = {"format_version": 1, **self.identity, **about, "columns": list(parts[SCORES][0].column_names)}
        if bytes_per_token is not None:
            n_cached = sum(json.loads((d / "DONE").read_text())["cached"] for d in dirs)
            manifest["cache"] = {**manifest["cache"], "sequences_cached": n_cached, "bytes_per_token": bytes_per_token}
        new_manifest = self.out / f".{MANIFEST}.tmp-{os.getpid()}"  # renamed in last
        try:
            with contextlib.ExitStack() as swaps:  # on leaving: cache/, then scores/ renamed in
                tmps = {name: swaps.enter_context(atomic_output_dir(self.out / name, MERGED, overwrite=True))
                        for name in (SCORES, CACHE) if parts[name]}
                try:
                    for name, tmp in tmps.items():
                        datasets.concatenate_datasets(parts[name]).save_to_disk(str(tmp))
                    if CACHE in tmps:
                        src = next(d / CACHE for d in dirs if (d / CACHE).is_dir())
                        (tmps[CACHE] / CACHE_INFO).write_text((src / CACHE_INFO).read_text())
                    atomic_write_text(new_manifest, json.dumps(manifest, indent=2) + "\n")
                except BaseException as e:
                    if isinstance(e, NoSpaceError) or out_of_space(e, self.out):  # before the copies are removed
                        raise no_space_error(self.out, f"the merged {SCORES}/" + (f", {CACHE}/" if parts[CACHE]
                                                                                   else ""), self.kept()) from None
                    raise
                (self.out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is renamed in
            if not parts[CACHE]:
                remove_output(self.out / CACHE, MERGED)  # an old run's cache is not this run's
            os.replace(new_manifest, self.out / MANIFEST)
        finally:
            new_manifest.unlink(missing_ok=True)
        # merged copies exist now, and the manifest marks the result complete
        remove_output(self.out / SHARDS, ("shard_*", LOCK))
        return manifest


@contextlib.contextmanager
def out_dir_lock(out: Path, exclusive: bool) -> Iterator[None]:
    """Hold `out/shards/.score.lock` while scoring into `out` in a plain process: exclusive for a whole run or a
    merge, shared for `shard=` jobs (they write disjoint shards). A second process that cannot take it is refused,
    naming the holder; the last holder removes it, and the directories made for it alone."""
    shards = out / SHARDS
    if shards.exists() and not shards.is_dir():
        raise UserError(f"out_dir={out}: {shards} is a file, not the shards directory this command writes; move it")
    made = [p for p in (out, shards) if not p.exists()]
    shards.mkdir(parents=True, exist_ok=True)
    try:
        with lock_file(shards / LOCK, exclusive, remove=True):
            yield
    except LockBusy as e:
        raise UserError(f"out_dir={out} is being written by another data_tools.score process ({e.holders}); wait "
                        "for it to finish, or choose another out_dir") from None
    finally:
        for p in reversed(made):  # made for the lock alone: nothing was written
            with contextlib.suppress(OSError):
                p.rmdir()
