"""`python -m data_tools.select CONFIG [overrides]`: choose a subset of scored sequences by policy.

Policies (each keeps `fraction` of the scorable sequences unless a band is given):
- salt_ds:    the highest SALT_DS scores ("challenging yet learnable"), or a percentile band [lo, hi];
- ppl_band:   a low, middle or high band of SLM mean loss (= log perplexity; Ankner et al. 2024);
- difference: the highest ref_mean_loss - mean_loss (`ref_minus_slm`) or the reverse (MiniPLM / RHO-style);
- random:     the control, seeded.
Sequences whose policy score is NaN (e.g. SALT_DS with no learnable token) are never kept, nor, with
`max_confident_wrong` < 1, those the SLM is too often confidently wrong on (likely noise); `fraction` then counts
the scorable sequences that remain.

Output `out_dir/`: index.npy (sorted int64 sequence indices), selection.json, report.md, hist_*.png, and README.md,
the subset's Hugging Face dataset card (data_tools/select_report.py renders both documents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from data_tools.select_report import (
    REPORT,
    Selection,
    Texts,
    above,
    render_card,
    render_report,
    write_figures,
)
from slm_assist.core.config import check, check_no_effect, parse_cli
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_output_dir, check_output_dir
from slm_assist.core.scores import ScoresDir
from slm_assist.core.selection import CARD, FIGURES, INDEX, SUMMARY, write_selection

USAGE = "python -m data_tools.select CONFIG [key=value ...]"


@dataclass
class SelectConfig:
    scores: str = "runs/demo/scores"
    """A data_tools.score output directory."""
    out_dir: str = "runs/demo/select"
    overwrite: bool = False
    policy: Literal["salt_ds", "ppl_band", "difference", "random"] = "salt_ds"
    fraction: float = 0.5
    """Kept fraction of the scorable sequences, in (0, 1]."""
    band: list[float] = field(default_factory=list)
    """salt_ds only: a percentile band [lo, hi] (0-100) instead of the top `fraction`; [] = off."""
    ppl_band: Literal["low", "middle", "high"] = "middle"
    difference: Literal["ref_minus_slm", "slm_minus_ref"] = "ref_minus_slm"
    seed: int = 0
    """random only."""
    max_confident_wrong: float = 1.0
    """Exclude sequences whose `confident_wrong` share (positions where the SLM is confident and wrong; Confident
    Learning, Northcutt et al.: likely label noise) is above this, before any policy ranks; 1.0 = off."""

    def __post_init__(self) -> None:
        check(0 < self.fraction <= 1, "fraction", self.fraction, "in (0, 1]")
        check(0 <= self.max_confident_wrong <= 1, "max_confident_wrong", self.max_confident_wrong, "in [0, 1]")
        if self.band:
            check(len(self.band) == 2, "band", self.band, "[lo, hi]")
            lo, hi = self.band
            check(0 <= lo < hi <= 100, "band", self.band, "percentiles with 0 <= lo < hi <= 100")
        own = {"band": "salt_ds", "ppl_band": "ppl_band", "difference": "difference", "seed": "random"}
        check_no_effect(self, [k for k, policy in own.items() if self.policy != policy], f"with policy={self.policy}")


def policy_score(cols: dict[str, np.ndarray], cfg: SelectConfig, source: str) -> tuple[str, np.ndarray]:
    """(name, per-sequence score) that the policy ranks by."""
    def need(name: str) -> np.ndarray:
        if name not in cols:
            raise UserError(f"{source}: policy={cfg.policy} needs score column '{name}', which is missing "
                            f"(columns: {sorted(cols)})" + ("; score with ref_model=..." if name.startswith("ref") else ""))
        return cols[name].astype(np.float64)

    if cfg.policy == "salt_ds":
        return "salt_ds", need("salt_ds")
    if cfg.policy == "ppl_band":
        return "mean_loss", need("mean_loss")
    if cfg.policy == "difference":
        diff = need("ref_mean_loss") - need("mean_loss")
        return cfg.difference, diff if cfg.difference == "ref_minus_slm" else -diff
    return "mean_loss", need("mean_loss")  # random: plotted against mean loss


def flagged(cols: dict[str, np.ndarray], cfg: SelectConfig, source: str) -> np.ndarray | None:
    """The rows `max_confident_wrong` excludes (confident_wrong share above it); None when the filter is off."""
    if cfg.max_confident_wrong >= 1:
        return None
    if "confident_wrong" not in cols:
        raise UserError(f"{source}: max_confident_wrong={cfg.max_confident_wrong} needs score column "
                        "'confident_wrong', which these scores lack (written before data_tools.score made it); "
                        "re-score them (overwrite=true), or set max_confident_wrong=1.0")
    return above(cols["confident_wrong"], cfg.max_confident_wrong)


def select(cols: dict[str, np.ndarray], cfg: SelectConfig, source: str = "scores") -> np.ndarray:
    """Boolean keep-mask over the rows of `cols` (row order = `cols['index']`)."""
    _, score = policy_score(cols, cfg, source)
    excluded = flagged(cols, cfg, source)
    valid = np.isfinite(score) if excluded is None else np.isfinite(score) & ~excluded
    n_valid = int(valid.sum())
    keep = np.zeros(len(score), dtype=bool)
    n_keep = round(cfg.fraction * n_valid)
    rows = np.flatnonzero(valid)
    if cfg.policy == "random":
        rng = np.random.default_rng(cfg.seed)
        keep[rng.choice(rows, size=n_keep, replace=False)] = True
    elif cfg.policy == "salt_ds" and cfg.band:
        lo, hi = np.percentile(score[rows], cfg.band)
        keep[rows[(score[rows] >= lo) & (score[rows] <= hi)]] = True
    else:
        # stable sort on (score, index) so ties break the same way every time
        order = rows[np.lexsort((cols["index"][rows], score[rows]))]  # ascending score
        if cfg.policy == "ppl_band" and cfg.ppl_band == "low":
            chosen = order[:n_keep]
        elif cfg.policy == "ppl_band" and cfg.ppl_band == "middle":
            start = (len(order) - n_keep) // 2
            chosen = order[start : start + n_keep]
        else:  # highest scores: salt_ds top, ppl_band high, difference
            chosen = order[len(order) - n_keep :]
        keep[chosen] = True
    if not keep.any():
        flags = "" if excluded is None else f" after {int(excluded.sum())} flagged by max_confident_wrong"
        raise UserError(f"{source}: policy={cfg.policy} selected no sequence ({n_valid} scorable of {len(score)}"
                        f"{flags}, fraction={cfg.fraction}, band={cfg.band}); widen the selection")
    return keep


OUTPUT = (INDEX, SUMMARY, REPORT, CARD, FIGURES)
"""Everything select writes into out_dir: with overwrite=true it replaces a directory holding only these."""


def run(cfg: SelectConfig) -> dict:
    check_output_dir(Path(cfg.out_dir), cfg.overwrite, own=OUTPUT)  # before the scores are read
    scores = ScoresDir.open(cfg.scores, "scores")
    cols, source = scores.columns(), f"scores={cfg.scores}"
    keep = select(cols, cfg, source)
    score_name, score = policy_score(cols, cfg, source)
    excluded = flagged(cols, cfg, source)
    summary = {"policy": cfg.policy, "kept": int(keep.sum()), "total": len(keep),
               "kept_fraction": float(keep.mean()), "config": asdict(cfg)}
    if excluded is not None:
        summary["flagged"] = int(excluded.sum())
    sel = Selection(cols, keep, score_name, score, asdict(cfg), scores.manifest, Texts(scores))
    with atomic_output_dir(Path(cfg.out_dir), OUTPUT, overwrite=cfg.overwrite) as tmp:
        write_selection(tmp, cols["index"][keep], summary)
        write_figures(sel, tmp)
        (tmp / REPORT).write_text(render_report(sel), encoding="utf-8")
        (tmp / CARD).write_text(render_card(sel), encoding="utf-8")
    print(f"selected {summary['kept']} of {summary['total']} sequences ({summary['kept_fraction']:.1%}) "
          f"-> {cfg.out_dir}/{INDEX}; report: {cfg.out_dir}/{REPORT}; dataset card: {cfg.out_dir}/{CARD}")
    return summary


def main(argv: Sequence[str]) -> None:
    run(parse_cli(argv, SelectConfig, USAGE, description=__doc__,
                  example="python -m data_tools.select configs/demo/select.yaml policy=ppl_band fraction=0.3"))


if __name__ == "__main__":
    run_cli(main)
