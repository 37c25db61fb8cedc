"""Selection policies on synthetic scores: exactly the expected sequences, the confident-wrong filter, the report
and dataset card, and clear errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from data_tools.select import SelectConfig, run, select
from slm_assist.core.config import load_config
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import ConfigError, UserError

# 10 sequences; salt_ds of #3 is NaN (no learnable token); confident_wrong above 0.1: #1, #4, #6, #8
COLS = {
    "index": np.arange(10),
    "mean_loss": np.array([5.0, 1.0, 3.0, 9.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5]),
    "salt_ds": np.array([2.0, 0.1, 1.5, np.nan, 3.0, 0.2, 2.5, 1.0, 2.2, 0.05]),
    "ref_mean_loss": np.array([5.5, 1.0, 5.0, 9.0, 7.1, 4.0, 8.0, 4.5, 6.0, 0.6]),
    "confident_wrong": np.array([0.0, 0.5, 0.05, 0.1, 0.3, 0.0, 0.2, 0.0, 0.15, 0.0]),
}
FLAGGED = [1, 4, 6, 8]


def write_scores(root, cols=COLS, data=None):
    """A data_tools.score output holding `cols`; with `data` (a packed dataset), its manifest names that dataset,
    as a real scoring run's does, so select can decode the sequences."""
    import datasets

    datasets.Dataset.from_dict({k: v.astype(np.float32 if k != "index" else np.int64) for k, v in cols.items()}
                               ).save_to_disk(str(root / "scores"))
    manifest = {"model_fingerprint": "0" * 16, "columns": list(cols), "topk": 10, "confident_threshold": 0.5}
    if data is not None:
        manifest.update(data=str(data), split="train", dataset_fingerprint=PackedDataset.open(data).fingerprint)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def kept(*overrides: str, cols=COLS) -> list[int]:
    cfg = load_config(SelectConfig, None, list(overrides))
    return sorted(cols["index"][select(cols, cfg)].tolist())


def test_salt_ds_top_fraction_skips_nan():
    # 9 scorable; 1/3 -> 3 highest salt_ds: #4 (3.0), #6 (2.5), #8 (2.2)
    assert kept("policy=salt_ds", "fraction=0.3333") == [4, 6, 8]


def test_salt_ds_percentile_band():
    # scorable salt_ds sorted: .05 .1 .2 1.0 1.5 2.0 2.2 2.5 3.0 ; the [25, 75] percentile band is [0.2, 2.2]
    assert kept("policy=salt_ds", "band=[25, 75]") == [0, 2, 5, 7, 8]


@pytest.mark.parametrize("band, expected", [("low", [1, 9]), ("middle", [0, 7]), ("high", [3, 6])])
def test_ppl_band(band, expected):
    assert kept("policy=ppl_band", f"ppl_band={band}", "fraction=0.2") == expected


def test_difference_both_directions():
    # ref - slm: #2 (+2.0), #5 (+2.0), #7 (+0.5) ...
    assert kept("policy=difference", "fraction=0.2") == [2, 5]
    # slm - ref: largest is 0 (#1, #3, #6, #8) -> ties break by index, highest indices last: #6, #8
    assert kept("policy=difference", "difference=slm_minus_ref", "fraction=0.2") == [6, 8]


def test_random_is_seeded_and_sized():
    a = kept("policy=random", "fraction=0.5", "seed=1")
    assert len(a) == 5 and a == kept("policy=random", "fraction=0.5", "seed=1")
    assert a != kept("policy=random", "fraction=0.5", "seed=2")


@pytest.mark.parametrize("override, pattern", [
    ("fraction=0", r"fraction: expected in \(0, 1\], got 0"),
    ("fraction=1.5", r"fraction: expected in \(0, 1\], got 1.5"),
    ("band=[60, 40]", r"band: expected percentiles with 0 <= lo < hi <= 100, got \[60.0, 40.0\]"),
    ("band=[50, 50]", r"band: expected percentiles"),
])
def test_bad_settings(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SelectConfig, None, [override])


@pytest.mark.parametrize("policy", ["policy=salt_ds", "policy=ppl_band", "policy=difference", "policy=random"])
def test_max_confident_wrong_excludes_exactly_the_flagged_sequences(policy):
    everything = kept(policy, "fraction=1")
    assert set(FLAGGED) <= set(everything)  # without the filter, the flagged ones are kept
    assert kept(policy, "fraction=1", "max_confident_wrong=0.1") == sorted(set(everything) - set(FLAGGED))
    assert kept(policy, "fraction=1", "max_confident_wrong=1.0") == everything  # 1.0 = off


def test_max_confident_wrong_counts_the_fraction_after_the_filter():
    # unfiltered: 4 of the 9 scorable; filtered: scorable and unflagged are #0 2.0, #2 1.5, #5 0.2, #7 1.0, #9 .05,
    # so 2 of 5
    assert kept("policy=salt_ds", "fraction=0.4") == [0, 4, 6, 8]
    assert kept("policy=salt_ds", "fraction=0.4", "max_confident_wrong=0.1") == [0, 2]
    # "above": a share equal to the threshold stays
    assert 8 in kept("policy=random", "fraction=1", "max_confident_wrong=0.15")
    assert kept("policy=random", "fraction=1", "max_confident_wrong=0") == [0, 5, 7, 9]
    with pytest.raises(UserError, match="selected no sequence .*after 10 flagged by max_confident_wrong"):
        kept("policy=random", "max_confident_wrong=0", cols={**COLS, "confident_wrong": np.ones(10)})


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_confident_wrong_is_validated(value):
    with pytest.raises(ConfigError, match=rf"max_confident_wrong: expected in \[0, 1\], got {value}"):
        load_config(SelectConfig, None, [f"max_confident_wrong={value}"])


def test_max_confident_wrong_on_old_scores_says_to_rescore(tmp_path):
    old = {k: v for k, v in COLS.items() if k != "confident_wrong"}  # scored before the column existed
    assert kept("policy=salt_ds", cols=old) == kept("policy=salt_ds")  # not needed with the filter off
    scores = write_scores(tmp_path / "old_scores", old)
    with pytest.raises(UserError, match=rf"scores={re.escape(str(scores))}: max_confident_wrong=0.2 needs score "
                                        r"column 'confident_wrong', which these scores lack.*re-score"):
        run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={tmp_path / 'sel'}",
                                             "max_confident_wrong=0.2"]))
    assert not (tmp_path / "sel").exists()
    run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={tmp_path / 'sel'}"]))  # filter off: fine
    report = (tmp_path / "sel" / "report.md").read_text()
    assert "No `confident_wrong` column" in report and "re-score" in report


def test_missing_column_and_empty_selection():
    cols = {k: v for k, v in COLS.items() if k != "ref_mean_loss"}
    with pytest.raises(UserError, match="needs score column 'ref_mean_loss', which is missing.*ref_model"):
        kept("policy=difference", cols=cols)
    with pytest.raises(UserError, match="selected no sequence"):
        kept("policy=salt_ds", "fraction=0.01")


def test_run_writes_index_report_and_plots(tmp_path):
    scores = write_scores(tmp_path / "scores")
    out = tmp_path / "sel"
    summary = run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}", "fraction=0.3333"]))
    assert summary["kept"] == 3 and "flagged" not in summary  # the filter is off
    assert np.load(out / "index.npy").tolist() == [4, 6, 8]
    report = (out / "report.md").read_text()
    assert "kept **3** of 10" in report and "| salt_ds |" in report and "![salt_ds](hist_salt_ds.png)" in report
    assert (out / "hist_salt_ds.png").read_bytes()[:4] == b"\x89PNG"
    # no dataset named in the manifest: the documents say so instead of failing
    assert "Sequence text not shown: scores=" in report and "does not name the scored dataset" in report
    with pytest.raises(UserError, match="exists and is not empty; set overwrite=true"):
        run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}"]))
    run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}", "overwrite=true"]))  # all select's own


def _decoded(data, index):
    ds = PackedDataset.open(data)
    return ds.tokenizer.decode(np.asarray(ds.split("train")[index]["input_ids"]).tolist())[:300]


def _fenced_texts(doc):
    return re.findall(r"^\*\*sequence (\d+)\*\* \((kept|not kept); ([^)]*)\):\n\n```text\n(.*?)\n```$", doc,
                      re.M | re.S)


def test_report_and_card_show_flags_counts_samples_and_the_command(tiny_data, tmp_path):
    scores = write_scores(tmp_path / "scores", data=tiny_data)
    out = tmp_path / "sel"
    args = [f"scores={scores}", f"out_dir={out}", "policy=ppl_band", "ppl_band=high", "fraction=0.4",
            "max_confident_wrong=0.1"]
    cfg = load_config(SelectConfig, None, args)
    summary = run(cfg)
    # ppl_band high of the 6 unflagged, scorable (#0 5.0, #2 3.0, #3 9.0, #5 2.0, #7 4.0, #9 0.5): #3, #0
    assert np.load(out / "index.npy").tolist() == [0, 3]
    assert summary["flagged"] == 4 and json.loads((out / "selection.json").read_text())["flagged"] == 4

    report = (out / "report.md").read_text()
    assert "`max_confident_wrong=0.1` (the filter" in report
    assert "- flagged among all: 4 of 10 (40.0%)" in report and "- flagged among kept: 0 of 2 (0.0%)" in report
    examples = _fenced_texts(report)
    assert [int(i) for i, *_ in examples] == [1, 4, 6]  # the 3 most flagged: 0.5, 0.3, 0.2
    for i, state, stats, text in examples:
        assert state == "not kept" and text == _decoded(tiny_data, int(i)) and len(text) > 0
        assert f"confident_wrong {COLS['confident_wrong'][int(i)]:.4f}" in stats
        assert f"mean_loss {COLS['mean_loss'][int(i)]:.4f}" in stats

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tags"] == ["slm_assist", "salt", "data-selection"] and front["size_categories"] == ["n<1K"]
    assert "ppl_band" in front["pretty_name"]
    assert "kept **2** of 10 sequences (fraction 0.2000)" in card
    assert "tokens kept: 2 × seq_len 32 = **64**" in card
    assert "| mean_loss |" in card and "![mean_loss](hist_mean_loss.png)" in card
    assert "- flagged among kept: 0 of 2 (0.0%)" in card
    samples = _fenced_texts(card)
    assert sorted(int(i) for i, *_ in samples) == [0, 3]  # the kept ones
    assert all(state == "kept" and text == _decoded(tiny_data, int(i)) for i, state, _, text in samples)
    # the command reproduces the selection exactly
    (block,) = re.findall(r"cat > select.yaml <<'EOF'\n(.*?)\nEOF\npython -m data_tools.select select.yaml\n", card, re.S)
    (tmp_path / "select.yaml").write_text(block)
    assert load_config(SelectConfig, tmp_path / "select.yaml") == cfg


def test_report_says_when_the_scored_dataset_is_gone(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    scores = write_scores(tmp_path / "scores", data=data)
    shutil.rmtree(data)
    out = tmp_path / "sel"
    run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}"]))
    report, card = (out / "report.md").read_text(), (out / "README.md").read_text()
    gone = f"the scored dataset {data} is no longer there (moved or deleted)"
    assert f"Sequence text not shown: scores={scores}: {gone}" in report
    assert "- flagged among all: 4 of 10 (40.0%)" in report and "0.1, a display threshold only" in report
    assert gone in card and "tokens kept: unknown" in card


@pytest.mark.parametrize("damage", ["arrow cut short", "state.json gone"])
def test_damaged_scores_name_the_file(tmp_path, damage):
    """A scores/ file cut short (a full disk, an interrupted copy) or missing: an error that names it and says to
    score again, not pyarrow's own message without a file name; nothing is written."""
    scores = write_scores(tmp_path / "scores")
    if damage == "arrow cut short":
        victim = next((scores / "scores").glob("data-*.arrow"))
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim = scores / "scores" / "state.json"
        victim.unlink()
    out = tmp_path / "sel"
    with pytest.raises(UserError, match=rf"^scores={re.escape(str(scores))}: {re.escape(str(victim))} is damaged and "
                                        r"cannot be read \(.+\); score the data again into it \(python -m "
                                        r"data_tools.score ... overwrite=true\)$"):
        run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}"]))
    assert not out.exists()
