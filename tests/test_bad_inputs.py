"""Every entry point against bad input, as a new user would give it: exit 2, one `error:` line that names the
field or file and the value, no traceback, and whatever was already in the output location byte-identical."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, TINY_MODEL, error_line, run_module

pytestmark = pytest.mark.slow

UNWRITABLE = Path("/sys/slm_assist_no_write")  # read-only even for root, where permission bits do not apply


@dataclass
class Case:
    module: str
    args: list[str]
    expect: list[str]
    """Substrings of the error line (the field or file, and the bad value)."""
    watch: list[str] = field(default_factory=list)
    """Paths whose whole content must be byte-identical afterwards."""
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tiny_data, tiny_slm, slm_other_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Finished outputs of every stage, plus the kinds of things users point commands at by mistake."""
    from data_tools.score import main as score_main
    from data_tools.select import main as select_main

    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "data": root / "data", "slm": tiny_slm, "other_tok": slm_other_tokenizer}
    shutil.copytree(tiny_data, w["data"])
    w["scores"] = root / "scores"
    score_main([str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}",
                f"out_dir={w['scores']}", "dtype=fp32", "torch_threads=1"])
    (w["scores"] / "my_model").mkdir()  # something of the user's that lives next to the scores
    (w["scores"] / "my_model" / "weights.bin").write_bytes(b"precious")
    w["select"] = root / "select"
    select_main([str(REPO / "configs/demo/select.yaml"), f"scores={w['scores']}", f"out_dir={w['select']}",
                 "fraction=0.2"])
    w["cache"] = root / "cache"  # soft labels for the selected subset only
    score_main([str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}",
                f"out_dir={w['cache']}", "dtype=fp32", "torch_threads=1", "cache.mode=top_k", "cache.k=4",
                f"cache.indices={w['select'] / 'index.npy'}"])
    w["damaged"] = root / "damaged_scores"  # its Arrow file cut short (a full disk, an interrupted copy)
    shutil.copytree(w["scores"], w["damaged"])
    arrow = next((w["damaged"] / "scores").glob("data-*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    w["unmerged"] = root / "unmerged"  # the finished shard of a run stopped before its merge
    score_main([str(REPO / "configs/demo/score.yaml"), f"model={tiny_slm}", f"data={tiny_data}",
                f"out_dir={w['unmerged']}", "dtype=fp32", "torch_threads=1", "num_shards=1", "shard=0"])
    from data_tools.pack import PrepareConfig, prepare
    from slm_assist.core.config import load_config

    w["other_data"] = root / "other_data"  # a task corpus packed with another tokenizer
    prepare(load_config(PrepareConfig, None, [f"out_dir={w['other_data']}", f"tokenizer.path={slm_other_tokenizer}",
                                              "corpus.max_docs=10", "pack.seq_len=32", "pack.val_fraction=0"]))
    other = np.setdiff1d(np.arange(200), np.load(w["select"] / "index.npy"))[:50]
    np.save(root / "other.npy", other)
    w["file"] = root / "a_file.txt"
    w["file"].write_text("not a directory\n")
    w["text_index"] = root / "index.txt"
    w["text_index"].write_text("1\n2\n3\n")
    w["mixed"] = root / "mixed"  # an output folder the user also keeps their own files in
    w["mixed"].mkdir()
    (w["mixed"] / "notes.md").write_text("mine\n")
    (root / "dotgit" / ".git").mkdir(parents=True)  # a folder whose only content is hidden, and the user's
    (root / "dotgit" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    w["short_ctx"] = root / "short_ctx"  # the SLM with positions for 16 tokens (the data has 32)
    shutil.copytree(tiny_slm, w["short_ctx"])
    config = json.loads((w["short_ctx"] / "config.json").read_text())
    (w["short_ctx"] / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    w["compress"] = root / "compress.yaml"  # one latent stage: a student of the SLM's width, one block
    w["compress"].write_text("stages:\n  - {name: gd, teacher: pretrained, data: general, max_steps: 1, "
                             "loss: {hidden: 1.0, attention: 1.0}}\n")
    w["latin1"] = root / "cloze_latin1.jsonl"
    w["latin1"].write_bytes(json.dumps({"context": "caf", "target": "X"}).encode().replace(b"X", b"\xe9") + b"\n")
    return w


def _train(w, run_dir, *extra) -> list[str]:
    return [str(REPO / "configs/demo/llm.yaml"), f"data.path={w['data']}", f"run_dir={run_dir}", *TINY_MODEL,
            "train.max_steps=2", "train.torch_threads=1", "train.micro_batch_size=4", *extra]


def _compress(w, *extra) -> list[str]:
    return [str(w["compress"]), f"run_dir={w['root'] / 'cmp'}", f"teacher={w['slm']}", f"general_data={w['data']}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.ffn_size=64",
            "model.max_position_embeddings=64", *extra]


def _cases(w) -> dict[str, Case]:
    r = w["root"]
    data_yaml = str(REPO / "configs/demo/data.yaml")
    score_yaml = str(REPO / "configs/demo/score.yaml")
    select_yaml = str(REPO / "configs/demo/select.yaml")
    typo = str(r / "corpus_typo.jsonl")
    return {
        # data loss: inputs are checked before an existing output is replaced
        "pack overwrite, corpus typo": Case("data_tools.pack", [data_yaml, f"out_dir={w['data']}", "overwrite=true",
                                                                f"corpus.paths=[{typo}]"], [typo], [w["data"]]),
        "score overwrite, model typo": Case("data_tools.score", [score_yaml, f"data={w['data']}", "overwrite=true",
                                                                 f"out_dir={w['scores']}", f"model={r / 'slm_typo'}"],
                                            ["model=", "slm_typo"], [w["scores"]]),
        "score into a packed dataset": Case("data_tools.score", [score_yaml, f"data={w['data']}", f"model={w['slm']}",
                                                                 f"out_dir={w['data']}", "overwrite=true"],
                                            [f"out_dir={w['data']}", "not a data_tools.score manifest"], [w["data"]]),
        "score shard into a packed dataset": Case("data_tools.score", [score_yaml, f"data={w['data']}",
                                                                       f"model={w['slm']}", f"out_dir={w['data']}",
                                                                       "num_shards=2", "shard=0"],
                                                  [f"out_dir={w['data']}", "not a data_tools.score manifest"],
                                                  [w["data"]]),
        "score merge into a packed dataset": Case("data_tools.score", [score_yaml, f"data={w['data']}",
                                                                       f"model={w['slm']}", f"out_dir={w['data']}",
                                                                       "merge_only=true", "overwrite=true"],
                                                  [f"out_dir={w['data']}", "not a data_tools.score manifest"],
                                                  [w["data"]]),
        "score merge over finished scores": Case("data_tools.score", [score_yaml, f"data={w['data']}",
                                                                      f"model={w['slm']}", f"out_dir={w['scores']}",
                                                                      "merge_only=true"],
                                                 [f"out_dir={w['scores']}", "already holds merged scores"],
                                                 [w["scores"]]),
        "select over a selection, scores cut short": Case("data_tools.select",
                                                          [select_yaml, f"scores={w['damaged']}",
                                                           f"out_dir={w['select']}", "overwrite=true"],
                                                          [f"scores={w['damaged']}", "data-00000-of-00001.arrow",
                                                           "is damaged", "score the data again"],
                                                          [w["select"], w["damaged"]]),
        "score over another run's shards": Case("data_tools.score", [score_yaml, f"data={w['data']}",
                                                                     f"model={w['slm']}", f"out_dir={w['unmerged']}",
                                                                     "num_shards=1", "topk=5"],
                                                [f"out_dir={w['unmerged']}", "shards of another scoring run",
                                                 "topk: 10 there, 5 here", "overwrite=true"], [w["unmerged"]]),
        "pack overwrite, a .git folder": Case("data_tools.pack", [data_yaml, f"out_dir={r / 'dotgit'}",
                                                                  "overwrite=true"], [".git"], [r / "dotgit"]),
        "eval context shorter than seq_len": Case("slm_assist.eval", [str(w["short_ctx"]), str(w["data"])],
                                                  ["max_position_embeddings=16", "seq_len=32"]),
        "score context shorter than seq_len": Case("data_tools.score", [score_yaml, f"data={w['data']}",
                                                                        f"model={w['short_ctx']}",
                                                                        f"out_dir={r / 'sc_new'}"],
                                                   ["model=", "max_position_embeddings=16", "seq_len=32"]),
        "select overwrite, foreign files": Case("data_tools.select", [select_yaml, f"scores={w['scores']}",
                                                                      f"out_dir={w['mixed']}", "overwrite=true"],
                                                [f"out_dir={w['mixed']}", "notes.md"], [w["mixed"]]),
        "pack overwrite, foreign files": Case("data_tools.pack", [data_yaml, f"out_dir={w['mixed']}", "overwrite=true"],
                                              [f"out_dir={w['mixed']}", "notes.md"], [w["mixed"]]),
        "tokenizer into a packed dataset": Case("data_tools.tokenizer", [data_yaml, f"out_dir={w['data']}",
                                                                         "overwrite=true"],
                                                [f"out_dir={w['data']}", "packed dataset"], [w["data"]]),
        # output paths, checked before any expensive work
        "pack out_dir is a file": Case("data_tools.pack", [data_yaml, f"out_dir={w['file']}"],
                                       [f"out_dir={w['file']}", "is a file"], [w["file"]]),
        "train run_dir is a file": Case("slm_assist.train", _train(w, w["file"]), [f"run_dir={w['file']}", "is a file"],
                                        [w["file"]]),
        "train run_dir read-only": Case("slm_assist.train", _train(w, UNWRITABLE), [f"run_dir={UNWRITABLE}",
                                                                                   "cannot write"]),
        "pack out_dir read-only": Case("data_tools.pack", [data_yaml, f"out_dir={UNWRITABLE}"],
                                       [f"out_dir={UNWRITABLE}", "cannot write"]),
        "select out_dir read-only": Case("data_tools.select", [select_yaml, f"scores={w['scores']}",
                                                               f"out_dir={UNWRITABLE}"], [f"out_dir={UNWRITABLE}"]),
        "score out_dir read-only": Case("data_tools.score", [score_yaml, f"data={w['data']}", f"model={w['slm']}",
                                                             f"out_dir={UNWRITABLE}"], [f"out_dir={UNWRITABLE}"]),
        # wrong kinds of input
        "select scores is a dataset": Case("data_tools.select", [select_yaml, f"scores={w['data']}",
                                                                 f"out_dir={r / 'sel_new'}"],
                                           [f"scores={w['data']}", "not a data_tools.score output"]),
        "selection is a text file": Case("slm_assist.train", _train(w, r / "t1", "distill.source.kind=teacher", f"distill.source.teachers=[{w['slm']}]",
                                                                    f"distill.data.selection={w['text_index']}"),
                                         [f"distill.data.selection={w['text_index']}", "not a .npy file"]),
        "selection without a teacher": Case("slm_assist.train", _train(w, r / "t2", f"distill.data.selection={w['select']}"),
                                            ["distill.data.selection=", "has no effect"]),
        "context shorter than seq_len": Case("slm_assist.train", _train(w, r / "t3", "model.max_position_embeddings=16"),
                                             ["model.max_position_embeddings=16", "seq_len=32"]),
        "gpt2 context shorter": Case("slm_assist.train", _train(w, r / "t5", "model.model_type=gpt2",
                                                                "model.max_position_embeddings=16"),
                                     ["model.max_position_embeddings=16", "seq_len=32"]),
        "cache misses the selection": Case("slm_assist.train", _train(w, r / "t4", "distill.source.kind=cache", f"distill.source.caches=[{w['cache']}]",
                                                                      f"distill.data.selection={r / 'other.npy'}"),
                                           [f"distill.source.caches[0]={w['cache']}", "not cached", "other.npy"]),
        "leftover tokenizer, other vocab": Case("data_tools.pack", [data_yaml, f"out_dir={r / 'leftover'}",
                                                                    "tokenizer.vocab_size=500"],
                                                ["tokenizer.vocab_size: 400 there, 500 here"], [r / "leftover"]),
        "compress teacher of another vocabulary": Case("slm_assist.compress",
                                                       _compress(w, f"teacher={w['other_tok']}"),
                                                       ["teacher=", "tokenizer fingerprint"]),
        "compress fine-tuned teacher of another vocabulary": Case(
            "slm_assist.compress", _compress(w, f"finetuned_teacher={w['other_tok']}",
                                             "stages=[{name: gd, teacher: finetuned, loss: {hidden: 1}}]"),
            ["finetuned_teacher=", "tokenizer fingerprint"]),
        "compress task data of another vocabulary": Case(  # each fingerprint next to the data it belongs to
            "slm_assist.compress", _compress(w, f"task_data={w['other_data']}"),
            [f"task_data={w['other_data']}: tokenizer fingerprint {_fingerprint(w['other_data'])} differs from the "
             f"data's {_fingerprint(w['data'])} ({w['data']})"]),
        "compress layer map outside the teacher": Case("slm_assist.compress",
                                                       _compress(w, "stages=[{name: gd, loss: {hidden: 1, "
                                                                    "layer_map: [3]}}]"),
                                                       ["stages.gd.loss.layer_map=[3]", "outside 1..2"]),
        "compress unknown init": Case("slm_assist.compress", _compress(w, "init.kind=distil"),
                                      ["init.kind", "'distil'"]),
        "compress teacher not made yet": Case("slm_assist.compress",
                                              _compress(w, "stages=[{name: ged, teacher: finetuned}]"),
                                              ["stage 'ged'", "fine-tuned teacher"]),
        "compress prune larger than teacher": Case("slm_assist.compress",
                                                   _compress(w, "init.kind=prune", "model.hidden_size=64")[:1]
                                                   + [a for a in _compress(w, "init.kind=prune")[1:]
                                                      if "max_position" not in a and "hidden_size" not in a]
                                                   + ["model.hidden_size=64"],
                                                   ["model.hidden_size=64", "1..32"]),
        "compress attention under sdpa": Case("slm_assist.compress", _compress(w, "model.attn_implementation=sdpa"),
                                              ["model.attn_implementation", "sdpa", "eager"]),
        "eval without data": Case("slm_assist.eval", [str(w["slm"])], ["DATA"]),
        "eval --max-rows 0": Case("slm_assist.eval", [str(w["slm"]), str(w["data"]), "--max-rows", "0"],
                                  ["--max-rows 0", "positive number", "-1 for all"]),
        "eval latin-1 jsonl": Case("slm_assist.eval", [str(w["slm"]), str(w["latin1"])], [str(w["latin1"]), "UTF-8"]),
        "cloze out unwritable": Case("data_tools.cloze", [str(w["data"]), str(UNWRITABLE / "cloze.jsonl")],
                                     [f"out={UNWRITABLE / 'cloze.jsonl'}", "cannot write"]),
        "report missing run": Case("slm_assist.report", [str(r / "no_run")], [str(r / "no_run")]),
        "hub push without token": Case("slm_assist.hub", ["push", str(w["slm"]), "--repo-id", "me/x"], ["HF_TOKEN"],
                                       [w["slm"]], env={"HF_TOKEN": "", "HF_HOME": str(r / "hf_home")}),
    }


def _fingerprint(data: Path) -> str:
    return json.loads((data / "manifest.json").read_text())["tokenizer_fingerprint"]


def _snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in paths:
        for f in [p, *p.rglob("*")] if p.is_dir() else [p]:
            out[str(f)] = (f.read_bytes() if f.is_file() else b"<dir>", f.stat().st_mode)
    return out


def test_every_entry_point_rejects_bad_input_cleanly(world, tiny_data, subtests):
    (world["root"] / "leftover").mkdir()
    shutil.copytree(tiny_data / "tokenizer", world["root"] / "leftover" / "tokenizer")  # made with vocab 400
    for name, case in _cases(world).items():
        with subtests.test(name):
            before = _snapshot(case.watch)
            res = run_module(case.module, case.args, env=case.env, timeout=300)
            assert res.returncode == 2, res.stderr[-3000:]
            line = error_line(res.stderr)
            for s in case.expect:
                assert s in line, (s, line)
            assert _snapshot(case.watch) == before
