"""Selection policies on synthetic scores: exactly the expected sequences, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_tools.select import SelectConfig, run, select
from slm_assist.core.config import load_config
from slm_assist.core.errors import ConfigError, UserError

# 10 sequences; salt_ds of #3 is NaN (no learnable token)
COLS = {
    "index": np.arange(10),
    "mean_loss": np.array([5.0, 1.0, 3.0, 9.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5]),
    "salt_ds": np.array([2.0, 0.1, 1.5, np.nan, 3.0, 0.2, 2.5, 1.0, 2.2, 0.05]),
    "ref_mean_loss": np.array([5.5, 1.0, 5.0, 9.0, 7.1, 4.0, 8.0, 4.5, 6.0, 0.6]),
}


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


def test_missing_column_and_empty_selection():
    cols = {k: v for k, v in COLS.items() if k != "ref_mean_loss"}
    with pytest.raises(UserError, match="needs score column 'ref_mean_loss', which is missing.*ref_model"):
        kept("policy=difference", cols=cols)
    with pytest.raises(UserError, match="selected no sequence"):
        kept("policy=salt_ds", "fraction=0.01")


def test_run_writes_index_report_and_plots(tmp_path):
    import datasets

    scores = tmp_path / "scores"
    datasets.Dataset.from_dict({k: v.astype(np.float32 if k != "index" else np.int64) for k, v in COLS.items()}
                               ).save_to_disk(str(scores / "scores"))
    (scores / "manifest.json").write_text(json.dumps({"model_fingerprint": "0" * 16, "columns": list(COLS)}))
    out = tmp_path / "sel"
    summary = run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}", "fraction=0.3333"]))
    assert summary["kept"] == 3
    assert np.load(out / "index.npy").tolist() == [4, 6, 8]
    report = (out / "report.md").read_text()
    assert "kept **3** of 10" in report and "| salt_ds |" in report and "![salt_ds](hist_salt_ds.png)" in report
    assert (out / "hist_salt_ds.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="exists and is not empty; set overwrite=true"):
        run(load_config(SelectConfig, None, [f"scores={scores}", f"out_dir={out}"]))
