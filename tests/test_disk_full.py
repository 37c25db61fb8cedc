"""A full disk while pack and score write: one `error:` line naming the directory, exit 2, and whatever was in the
output location before (an earlier packed dataset, an earlier run's merged scores) left as it was.

The fast tests simulate the failure (an OSError 28, or torch's zip writer's "unexpected pos" with little space left)
and run everywhere; the slow ones fill a real, small tmpfs (they need root to mount one, and skip otherwise)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from slm_assist.core.errors import UserError
from slm_assist.core.files import no_space_error, out_of_space

from .conftest import REPO, error_line, run_module

Usage = namedtuple("Usage", "total used free")
QUIET = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
"""Fewer progress bars on stderr (the scorer's own always shows on rank 0: `_error_line` drops them)."""
TORCH_SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 576 vs 534")


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(1 << 30, (1 << 30) - free, free))


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _error_line(stderr: str) -> str:
    """conftest's `error_line`, once the scorer's progress bar (it runs before the disk fills) is dropped."""
    return error_line("\n".join(line for line in stderr.splitlines() if "%|" not in line))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the helpers themselves, no mount needed ---------------------------------------------------------------

def test_out_of_space_knows_a_full_disk(monkeypatch, tmp_path):
    _free(monkeypatch, 100 << 10)  # 100 KiB left
    assert out_of_space(_no_space(), tmp_path)
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert out_of_space(TORCH_SHORT_WRITE, tmp_path / "not" / "made" / "yet")  # measured where it exists
    assert not out_of_space(OSError(errno.EROFS, "Read-only file system"), tmp_path)  # an errno is believed
    assert out_of_space(Exception("IoError: No space left on device (os error 28)"), tmp_path)  # safetensors'
    _free(monkeypatch, 10 << 30)  # plenty of space: a short write, or any other failure, is something else
    assert not out_of_space(TORCH_SHORT_WRITE, tmp_path)
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"), tmp_path)
    assert not out_of_space(RuntimeError("CUDA out of memory"), tmp_path)
    assert out_of_space(_no_space(), tmp_path)  # the errno says it, whatever df says


def test_no_space_error_names_the_place_what_and_what_was_kept(monkeypatch, tmp_path):
    _free(monkeypatch, 3 << 19)  # 1.5 MiB
    e = no_space_error(tmp_path, "out_dir=x", "x was left as it was")
    assert isinstance(e, UserError)
    assert str(e) == (f"no space left on {tmp_path} (1.5 MiB free now) while writing out_dir=x; x was left as it "
                      "was. Free some space (or choose another location) and run the same command again")


# ---- pack and score under a simulated full disk --------------------------------------------------------------

def _pack_args(tiny_corpus, out, *extra):
    return [f"out_dir={out}", f"corpus.paths=[{tiny_corpus}]", "tokenizer.vocab_size=400", "pack.seq_len=32",
            "pack.val_fraction=0.1", *extra]


@pytest.mark.parametrize("failure", ["manifest OSError 28", "split unexpected pos"])
def test_pack_on_a_full_disk_keeps_the_old_dataset(tiny_corpus, tmp_path, monkeypatch, failure):
    """The config and manifest are written with atomic_write_text inside the temp copy: its no-space error must
    come out as out_dir's (the old dataset kept), not as one about a file in a temp directory that is gone."""
    import data_tools.pack as pack
    from slm_assist.core.config import load_config

    out = tmp_path / "d"
    pack.prepare(load_config(pack.PrepareConfig, None, _pack_args(tiny_corpus, out)))
    before = _snapshot(out)
    if failure.startswith("manifest"):
        def fsync(fd):
            raise _no_space()

        monkeypatch.setattr(os, "fsync", fsync)  # atomic_write_text's (prepare_config.yaml, manifest.json)
    else:
        def write_split(rows, path):
            path.mkdir()
            (path / "data-00000-of-00001.arrow").write_bytes(b"x" * 534)
            raise TORCH_SHORT_WRITE

        monkeypatch.setattr(pack, "write_split", write_split)
    _free(monkeypatch, 1 << 20)
    with pytest.raises(UserError) as e:
        pack.prepare(load_config(pack.PrepareConfig, None, _pack_args(tiny_corpus, out, "overwrite=true")))
    assert str(e.value).startswith(f"no space left on {tmp_path} (1.0 MiB free now) while writing out_dir={out}; "
                                   f"{out} was left as it was."), str(e.value)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp copy left behind


def _score_args(tiny_data, tiny_slm, out, *extra):
    return [str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}", f"out_dir={out}",
            "batch_size=16", "dtype=fp32", "torch_threads=1", "num_shards=1", *extra]


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_score_on_a_full_disk_keeps_the_old_merged_scores(tiny_data, tiny_slm, tmp_path, monkeypatch, where):
    """Scoring again with overwrite=true and a soft-label cache: the disk fills while a shard is written, or while
    the merge writes the new scores/ and cache/. The earlier merged scores (manifest included: nothing marks them
    incomplete) stay as they were, and a shard that was finished is kept for the next try."""
    import datasets

    from data_tools.score import main

    out = tmp_path / "s"
    main(_score_args(tiny_data, tiny_slm, out))
    before = _snapshot(out)
    real_save = datasets.Dataset.save_to_disk
    prefix = ".shard_" if where == "shard" else (".scores.tmp-", ".cache.tmp-")

    def save_to_disk(self, path, *a, **kw):
        if Path(path).name.startswith(prefix) or Path(path).parent.name.startswith(prefix):
            raise _no_space()
        return real_save(self, path, *a, **kw)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_to_disk)
    _free(monkeypatch, 1 << 20)
    with pytest.raises(UserError) as e:
        main(_score_args(tiny_data, tiny_slm, out, "overwrite=true", "cache.mode=top_k", "cache.k=4"))
    msg = str(e.value)
    if where == "shard":
        assert msg.startswith(f"no space left on {out / 'shards'} (1.0 MiB free now) while writing shard 0 of 1 "
                              "(scores and soft-label cache);"), msg
    else:
        assert msg.startswith(f"no space left on {out} (1.0 MiB free now) while writing the merged scores/, "
                              "cache/;"), msg
    assert f"the merged scores in {out} were left as they were" in msg and "finished shards are kept" in msg
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("shards/")} == before
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]
    shards = sorted(p.name for p in (out / "shards").iterdir()) if (out / "shards").exists() else []
    assert shards == ([] if where == "shard" else ["shard_00000-of-00001"])


# ---- a real small filesystem -----------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """`small_fs(kib)`: a fresh tmpfs of that size under tmp_path (unmounted afterwards); `grow(path, kib)`
    resizes one. Skips where mounting is not permitted (not root, or no CAP_SYS_ADMIN in a container)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("filling a real small filesystem needs root to mount a tmpfs")
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip() or res.returncode}")
        mounted.append(path)
        return path

    def grow(path: Path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)

    mount.grow = grow
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def _kib(path: Path) -> int:
    """What `path`'s files take on a tmpfs (whole pages), in KiB."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_pack_overwrite_on_a_full_filesystem(tiny_corpus, tiny_data, small_fs):
    """Room for one packed dataset and a half: the first pack fits, overwrite=true (the new copy is built next
    to the old one) runs out of space."""
    fs = small_fs(_kib(tiny_data) * 3 // 2)
    out = fs / "data"
    args = [str(REPO / "configs/demo/data.yaml"), *_pack_args(tiny_corpus, out)]
    res = run_module("data_tools.pack", args, env=QUIET, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    before = _snapshot(out)
    res = run_module("data_tools.pack", [*args, "overwrite=true"], env=QUIET, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res.stderr)
    assert re.fullmatch(rf"error: no space left on {fs} \(\d+\.\d MiB free now\) while writing out_dir={out}; {out} "
                        r"was left as it was\. Free some space \(or choose another location\) and run the same "
                        r"command again", line), line
    assert _snapshot(out) == before
    assert sorted(p.name for p in fs.iterdir()) == ["data"]  # the partial copy is gone: its space is free again


@pytest.mark.slow
def test_score_with_a_cache_on_a_full_filesystem(tiny_data, tiny_slm, small_fs, tmp_path):
    """Scores without a cache fit; scoring again with a soft-label cache (overwrite=true) does not: first the
    shard does not fit, then (more room) the shard fits but the merged copy does not. Both times the old merged
    scores stay as they were; with room enough, the same command merges the finished shard without scoring."""
    from data_tools.score import main

    cache_args = ["overwrite=true", "cache.mode=top_k", "cache.k=4"]
    main(_score_args(tiny_data, tiny_slm, tmp_path / "ref", *cache_args))  # how much room the cache takes
    cache_kib = _kib(tmp_path / "ref" / "cache")
    old_kib = _kib(tmp_path / "ref" / "scores") + 8
    fs = small_fs(old_kib * 3 + cache_kib // 2)
    out = fs / "scores"
    res = run_module("data_tools.score", _score_args(tiny_data, tiny_slm, out), env=QUIET, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    before = _snapshot(out)

    res = run_module("data_tools.score", _score_args(tiny_data, tiny_slm, out, *cache_args), env=QUIET, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res.stderr)
    assert line.startswith(f"error: no space left on {out / 'shards'} (") and "while writing shard 0 of 1" in line
    assert f"the merged scores in {out} were left as they were" in line, line
    assert _snapshot(out) == before

    small_fs.grow(fs, old_kib * 3 + cache_kib * 3 // 2)  # room for the shard, not for its merged copy too
    res = run_module("data_tools.score", _score_args(tiny_data, tiny_slm, out, *cache_args), env=QUIET, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _error_line(res.stderr)
    assert line.startswith(f"error: no space left on {out} (") and "while writing the merged scores/, cache/" in line
    assert f"the merged scores in {out} were left as they were, and finished shards are kept" in line, line
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("shards/")} == before

    small_fs.grow(fs, old_kib * 3 + cache_kib * 3)
    res = run_module("data_tools.score", _score_args(tiny_data, tiny_slm, out, *cache_args), env=QUIET, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping 1 finished shard(s)" in res.stdout and not (out / "shards").exists()
    for name in ("data-00000-of-00001.arrow", "cache_info.json"):  # state.json has a random fingerprint
        assert (out / "cache" / name).read_bytes() == (tmp_path / "ref" / "cache" / name).read_bytes()
