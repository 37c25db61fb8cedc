"""What commands leave behind: outputs readable by colleagues (the umask, not mkstemp's 0600), nothing from a
failed run, no stale temp copies, and no silent reuse of a run or tokenizer made with other settings."""

from __future__ import annotations

import json
import os
import stat

import pytest

from data_tools.pack import PrepareConfig, prepare
from slm_assist.core.config import load_config
from slm_assist.core.errors import UserError
from slm_assist.core.tokenizer import load_tokenizer
from slm_assist.train import main as train_main

from .conftest import REPO, run_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _private(root) -> list[str]:
    """Paths under `root` that group/others cannot read (or, for directories, enter)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        need = 0o055 if p.is_dir() else 0o044
        if mode & need != need:
            bad.append(f"{p.relative_to(root)} {oct(mode)}")
    return bad


def test_outputs_respect_the_umask(tiny_data, tiny_slm, tmp_path, umask_022):
    from data_tools.score import main as score_main
    from data_tools.select import main as select_main
    from slm_assist.eval import main as eval_main

    data = tmp_path / "data"
    prepare(load_config(PrepareConfig, None, [f"out_dir={data}", f"tokenizer.path={tiny_data / 'tokenizer'}",
                                              "corpus.max_docs=20", "pack.seq_len=16", "pack.val_fraction=0.3"]))
    scores, select, run = tmp_path / "scores", tmp_path / "select", tmp_path / "run"
    score_main([str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}",
                f"out_dir={scores}", "dtype=fp32", "torch_threads=1", "cache.mode=top_k", "cache.k=4"])
    select_main([str(REPO / "configs/demo/select.yaml"), f"scores={scores}", f"out_dir={select}"])
    train_main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=1"))
    eval_main([str(run / "final"), str(tiny_data), "--max-rows", "4", "--out", str(run / "eval.json")])
    for root in (data, scores, select, run):
        assert _private(root) == [], root


def test_long_single_line_documents_train_the_tokenizer(tmp_path, capsys):
    """sentencepiece skips lines over its length limit: documents that are one long line each must be split,
    not dropped (the tokenizer would then know none of their words)."""
    from data_tools.corpus import CorpusConfig, read_documents

    words = " ".join(d.replace("\n", " ") for d in read_documents(CorpusConfig(max_docs=40))).split()
    docs = [" ".join(words[i : i + 1000]) for i in range(0, len(words), 1000)][:40]  # ~6,000 characters each
    assert min(len(d) for d in docs) > 4192
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "d"
    prepare(load_config(PrepareConfig, None, [f"out_dir={out}", f"corpus.paths=[{corpus}]",
                                              "tokenizer.vocab_size=600", "pack.seq_len=64", "pack.val_fraction=0"]))
    printed = capsys.readouterr().out
    assert "lines over 4192 bytes split at whitespace" in printed
    tok = load_tokenizer(out / "tokenizer")
    text = " ".join(words[:300])
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < 0.5 * len(text)  # not byte pieces
    record = json.loads((out / "tokenizer" / "slm_assist_tokenizer.json").read_text())
    assert record["trained_on"]["characters"] == sum(len(d) for d in docs)
    assert record["trained_on"]["long_lines"] == len(docs)


def test_failed_pack_leaves_nothing_behind(tiny_data, tmp_path):
    out = tmp_path / "d"
    args = [f"out_dir={out}", f"tokenizer.path={tiny_data / 'tokenizer'}", "corpus.max_docs=1", "pack.seq_len=16",
            "pack.val_fraction=0.5"]
    with pytest.raises(UserError, match="split '(train|validation)' has 0 documents"):
        prepare(load_config(PrepareConfig, None, args))
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no tokenizer/, train/ or temp dir
    prepare(load_config(PrepareConfig, None, [*args[:-1], "pack.val_fraction=0"]))  # the fix needs no overwrite


def test_leftover_tokenizer_is_reused_only_with_its_settings(tiny_corpus, tmp_path):
    from data_tools.tokenizer import main as tokenizer_main

    out = tmp_path / "d"
    common = [str(REPO / "configs/demo/data.yaml"), f"out_dir={out}", f"corpus.paths=[{tiny_corpus}]"]
    tokenizer_main([*common, "tokenizer.vocab_size=450"])
    with pytest.raises(UserError, match=r"tokenizer\.vocab_size: 450 there, 500 here.*overwrite=true"):
        prepare(load_config(PrepareConfig, str(REPO / "configs/demo/data.yaml"),
                            common[1:] + ["tokenizer.vocab_size=500"]))
    manifest = prepare(load_config(PrepareConfig, str(REPO / "configs/demo/data.yaml"),
                                   common[1:] + ["tokenizer.vocab_size=450", "pack.seq_len=32"]))
    assert manifest["vocab_size"] == len(load_tokenizer(out / "tokenizer"))


def test_rerun_asking_for_fewer_steps_is_an_error(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2"))
    stale = run / ".final.tmp-abc123"  # an export killed mid-write
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match=r"run_dir=.* checkpoint at step 4, past train\.max_steps=2"):
        train_main(run_overrides(tiny_data, run, "train.max_steps=2"))
    assert (run / "config.yaml").read_bytes() == config
    train_main(run_overrides(tiny_data, run, "train.max_steps=4", "checkpoint.every=2"))  # the same run: done
    assert not stale.exists()
    # starting over in the same run_dir: the old run's later checkpoint goes, the new run's stay
    train_main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=1", "checkpoint.resume=false"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    train_main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=1"))  # resumes the new run


def test_atomic_output_dir_recovers_and_rolls_back(tmp_path, monkeypatch):
    from slm_assist.core import files

    out = tmp_path / "out"
    old = tmp_path / ".out.old-123"  # killed between moving the old copy aside and renaming the new one in
    old.mkdir()
    (old / "manifest.json").write_text("complete\n")
    trash = tmp_path / ".out.trash-7"  # killed while deleting a replaced copy: never to be restored
    trash.mkdir()
    (trash / "manifest.json").write_text("half deleted\n")
    with pytest.raises(UserError, match="exists and is not empty"):
        with files.atomic_output_dir(out, ("manifest.json",)):
            pass
    assert (out / "manifest.json").read_text() == "complete\n"  # the only complete copy is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    real_replace = os.replace
    calls = []

    def failing_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_second_rename)
    with pytest.raises(UserError, match=r"out_dir=.*out: cannot replace it \(Device or resource busy\); it was left"):
        with files.atomic_output_dir(out, ("manifest.json",), overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new\n")
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == "complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with files.atomic_output_dir(tmp_path / "link", ("x",), overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "link").is_symlink() and (target / "x").read_text() == "x"
