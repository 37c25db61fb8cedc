"""`python -m data_tools.select CONFIG [overrides]`: choose a subset of scored sequences by policy.

Policies (each keeps `fraction` of the scorable sequences unless a band is given):
- salt_ds:    the highest SALT_DS scores ("challenging yet learnable"), or a percentile band [lo, hi];
- ppl_band:   a low, middle or high band of SLM mean loss (= log perplexity; Ankner et al. 2024);
- difference: the highest ref_mean_loss - mean_loss (`ref_minus_slm`) or the reverse (MiniPLM / RHO-style);
- random:     the control, seeded.
Sequences whose policy score is NaN (e.g. SALT_DS with no learnable token) are never kept.

Output `out_dir/`: index.npy (sorted int64 sequence indices), selection.json, report.md, hist_*.png.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from slm_assist.core.config import check, check_no_effect, parse_cli
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_output_dir, check_output_dir
from slm_assist.core.scores import ScoresDir
from slm_assist.core.selection import INDEX, SUMMARY, write_selection

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

    def __post_init__(self) -> None:
        check(0 < self.fraction <= 1, "fraction", self.fraction, "in (0, 1]")
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


def select(cols: dict[str, np.ndarray], cfg: SelectConfig, source: str = "scores") -> np.ndarray:
    """Boolean keep-mask over the rows of `cols` (row order = `cols['index']`)."""
    _, score = policy_score(cols, cfg, source)
    valid = np.isfinite(score)
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
        raise UserError(f"{source}: policy={cfg.policy} selected no sequence ({n_valid} scorable of {len(score)}, "
                        f"fraction={cfg.fraction}, band={cfg.band}); widen the selection")
    return keep


def _plot(values: np.ndarray, keep: np.ndarray, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.isfinite(values)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(values[finite], bins=60)
    ax.hist(values[finite], bins=bins, color="#bbbbbb", label="all")
    ax.hist(values[finite & keep], bins=bins, color="#1f77b4", alpha=0.85, label="kept")
    ax.set_xlabel(name)
    ax.set_ylabel("sequences")
    ax.legend()
    ax.set_title(f"{name}: kept {int(keep.sum())} of {len(values)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(values: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """(mean, "p10 / p50 / p90") of the finite values under `mask`."""
    x = values[mask & np.isfinite(values)]
    if not len(x):
        return "-", "-"
    return f"{x.mean():.4f}", " / ".join(f"{q:.4f}" for q in np.percentile(x, [10, 50, 90]))


def _report(cols: dict[str, np.ndarray], keep: np.ndarray, cfg: SelectConfig, score_name: str) -> str:
    n, k = len(keep), int(keep.sum())
    lines = [f"# Selection: {cfg.policy}", "", f"- scores: `{cfg.scores}`",
             f"- kept **{k}** of {n} sequences (fraction {k / n:.4f})",
             f"- policy score: `{score_name}`; settings: `{json.dumps({x: y for x, y in asdict(cfg).items() if x not in ('scores', 'out_dir', 'overwrite')})}`",
             "", "| score | all: mean | all: p10 / p50 / p90 | kept: mean | kept: p10 / p50 / p90 | NaN |",
             "|---|---|---|---|---|---|"]
    for name, v in cols.items():
        if name == "index":
            continue
        a, b = _summary(v, np.ones_like(keep)), _summary(v, keep)
        lines.append(f"| {name} | {a[0]} | {a[1]} | {b[0]} | {b[1]} | {int((~np.isfinite(v)).sum())} |")
    lines += ["", "Histograms (kept region in blue):", ""]
    lines += [f"![{name}](hist_{name}.png)" for name in _plotted(cols, score_name)]
    return "\n".join(lines) + "\n"


def _plotted(cols: dict[str, np.ndarray], score_name: str) -> list[str]:
    """The policy's score first, then the SALT_DS and loss histograms for context."""
    return [score_name] + [c for c in ("salt_ds", "mean_loss") if c in cols and c != score_name]


OUTPUT = (INDEX, SUMMARY, "report.md", "hist_*.png")
"""Everything select writes into out_dir: with overwrite=true it replaces a directory holding only these."""


def run(cfg: SelectConfig) -> dict:
    check_output_dir(Path(cfg.out_dir), cfg.overwrite, own=OUTPUT)  # before the scores are read
    cols = ScoresDir.open(cfg.scores, "scores").columns()
    keep = select(cols, cfg, f"scores={cfg.scores}")
    score_name, score = policy_score(cols, cfg, cfg.scores)
    index = cols["index"][keep]
    summary = {"policy": cfg.policy, "kept": int(keep.sum()), "total": len(keep),
               "kept_fraction": float(keep.mean()), "config": asdict(cfg)}
    with atomic_output_dir(Path(cfg.out_dir), overwrite=cfg.overwrite, own=OUTPUT) as tmp:
        write_selection(tmp, index, summary)
        plot_cols = {**cols, score_name: score}
        for name in _plotted(cols, score_name):
            _plot(plot_cols[name], keep, name, tmp / f"hist_{name}.png")
        (tmp / "report.md").write_text(_report(cols, keep, cfg, score_name))
    print(f"selected {summary['kept']} of {summary['total']} sequences ({summary['kept_fraction']:.1%}) "
          f"-> {cfg.out_dir}/{INDEX}; report: {cfg.out_dir}/report.md")
    return summary


def main(argv: Sequence[str]) -> None:
    run(parse_cli(argv, SelectConfig, USAGE, description=__doc__,
                  example="python -m data_tools.select configs/demo/select.yaml policy=ppl_band fraction=0.3"))


if __name__ == "__main__":
    run_cli(main)
