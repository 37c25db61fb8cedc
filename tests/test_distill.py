"""SALT objective in the trainer: teacher checks before any step, the loss mix and the KD phase."""

from __future__ import annotations

import shutil

import pytest

from slm_assist.errors import UserError
from slm_assist.metrics import read_metrics
from slm_assist.train import main

from .conftest import run_overrides

pytestmark = pytest.mark.slow


def test_salt_run_mixes_ce_and_kd_then_hands_over(tiny_data, tiny_slm, tmp_path):
    run = tmp_path / "salt"
    main(run_overrides(tiny_data, run, "train.max_steps=6", "checkpoint.every=0", "model.pad_vocab_to=64",
                       f"distill.teacher={tiny_slm}", "distill.schedule.kind=step", "distill.schedule.weight=0.6",
                       "distill.schedule.n_kd_steps=3", "distill.chunk_tokens=16"))
    recs = read_metrics(run)
    assert [r["w_t"] for r in recs] == [0.6, 0.6, 0.6, 0.0, 0.0, 0.0]
    assert [r["kd_phase"] for r in recs] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    for r in recs[:3]:
        assert r["kd"] > 0
        assert r["loss"] == pytest.approx(0.4 * r["ce"] + 0.6 * r["kd"], rel=1e-5)
    for r in recs[3:]:
        assert "kd" not in r and r["loss"] == pytest.approx(r["ce"], rel=1e-6)


def test_teacher_with_another_tokenizer_fails_before_any_step(tiny_data, tiny_slm, tmp_path):
    from data_tools.tokenizer import TokenizerConfig, train_sentencepiece

    other = tmp_path / "other"
    shutil.copytree(tiny_slm, other)
    train_sentencepiece(["an unrelated corpus makes an unrelated vocabulary " * 30], TokenizerConfig(vocab_size=300),
                        tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, other / f.name)
    run = tmp_path / "r"
    with pytest.raises(UserError, match=r"distill\.teacher=.*other: tokenizer fingerprint \w+ differs from the data's"):
        main(run_overrides(tiny_data, run, "train.max_steps=2", f"distill.teacher={other}"))
    assert not (run / "metrics.jsonl").exists()  # no step ran


def test_padded_vocab_sizes_may_differ(tiny_data, tiny_slm, tmp_path):
    """Teacher 400 rows (unpadded), student padded to 448: only the 400 real tokens are compared."""
    run = tmp_path / "pad"
    main(run_overrides(tiny_data, run, "train.max_steps=2", "checkpoint.every=0", "model.pad_vocab_to=64",
                       f"distill.teacher={tiny_slm}", "distill.schedule.kind=constant"))
    assert all(r["kd"] > 0 for r in read_metrics(run))
