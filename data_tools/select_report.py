"""What `data_tools.select` writes for people: report.md, the subset's Hugging Face dataset card (README.md) and the
hist_*.png figures both link. The two documents are built from the same sections (counts, score table,
histograms, confident-wrong flags, decoded sequences), so they cannot disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from slm_assist.core.errors import UserError
from slm_assist.core.scores import ScoresDir

REPORT = "report.md"
FLAG_SHOWN = 0.1
"""With the filter off (max_confident_wrong=1.0), the documents count a sequence as flagged above this share."""
N_SHOWN = 3  # decoded sequences per section
SNIPPET = 300  # characters of decoded text per sequence
CARD_TAGS = ["slm_assist", "salt", "data-selection"]


class Texts:
    """Decoded text of scored sequences, from the packed dataset the scores name; when it cannot be opened (moved,
    deleted, re-packed), `note` says why and nothing is decoded."""

    def __init__(self, scores: ScoresDir) -> None:
        self.data, self.note = None, ""
        try:
            data = scores.dataset()
            self.rows = data.split(scores.manifest.get("split", "train"))
            self.tokenizer = data.tokenizer  # opened and checked against the manifest now, not mid-document
            self.data = data
        except UserError as e:
            self.note = str(e)

    @property
    def seq_len(self) -> int | None:
        return self.data.seq_len if self.data is not None else None

    def get(self, index: int) -> str:
        ids = np.asarray(self.rows[int(index)]["input_ids"]).tolist()
        return self.tokenizer.decode(ids)[:SNIPPET]


@dataclass
class Selection:
    """One selection, as select made it: the score columns, the keep-mask over their rows, the policy's score."""

    cols: dict[str, np.ndarray]
    keep: np.ndarray
    score_name: str
    score: np.ndarray
    config: dict[str, Any]
    """The resolved SelectConfig (asdict)."""
    manifest: dict[str, Any]
    """The scores' manifest (what scored them)."""
    texts: Texts


# ---- sections shared by report.md and README.md -----------------------------------------------------------------
def _counts(sel: Selection) -> list[str]:
    n, k = len(sel.keep), int(sel.keep.sum())
    m = sel.manifest
    lines = [f"- scores: `{sel.config['scores']}` (SLM `{m.get('model', '?')}` on `{m.get('data', '?')}` split "
             f"`{m.get('split', '?')}`; top-k {m.get('topk', '?')}, confident_threshold "
             f"{m.get('confident_threshold', '(not recorded)')})",
             f"- kept **{k}** of {n} sequences (fraction {k / n:.4f})"]
    seq_len = sel.texts.seq_len
    lines.append(f"- tokens kept: {k:,} × seq_len {seq_len} = **{k * seq_len:,}**" if seq_len
                 else f"- tokens kept: unknown (no seq_len: {sel.texts.note})")
    return lines


def _summary(values: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """(mean, "p10 / p50 / p90") of the finite values under `mask`."""
    x = values[mask & np.isfinite(values)]
    if not len(x):
        return "-", "-"
    return f"{x.mean():.4f}", " / ".join(f"{q:.4f}" for q in np.percentile(x, [10, 50, 90]))


def _table(sel: Selection) -> list[str]:
    lines = ["| score | all: mean | all: p10 / p50 / p90 | kept: mean | kept: p10 / p50 / p90 | NaN |",
             "|---|---|---|---|---|---|"]
    for name, v in sel.cols.items():
        if name == "index":
            continue
        a, b = _summary(v, np.ones_like(sel.keep)), _summary(v, sel.keep)
        lines.append(f"| {name} | {a[0]} | {a[1]} | {b[0]} | {b[1]} | {int((~np.isfinite(v)).sum())} |")
    return lines


def plotted(sel: Selection) -> list[str]:
    """The policy's score first, then the SALT_DS and loss histograms for context."""
    return [sel.score_name] + [c for c in ("salt_ds", "mean_loss") if c in sel.cols and c != sel.score_name]


def _histograms(sel: Selection) -> list[str]:
    return ["Histograms (kept region in blue):", "", *[f"![{name}](hist_{name}.png)" for name in plotted(sel)]]


def above(shares: np.ndarray, threshold: float) -> np.ndarray:
    """Rows whose confident_wrong share is above `threshold`, compared in float32, the dtype scores are stored in
    (0.1 as float32 is above 0.1 as float64: a share of 1/10 would count as above a threshold of 0.1)."""
    return shares.astype(np.float32) > np.float32(threshold)


def flag_threshold(config: dict[str, Any]) -> float:
    """The confident_wrong share above which the documents call a sequence flagged."""
    return config["max_confident_wrong"] if config["max_confident_wrong"] < 1 else FLAG_SHOWN


def _flags(sel: Selection, examples: bool) -> list[str]:
    """The flagged share among all and among kept sequences; with `examples`, the most flagged, decoded."""
    lines = ["## Confident-wrong flags", ""]
    if "confident_wrong" not in sel.cols:
        return lines + [f"No `confident_wrong` column: `{sel.config['scores']}` was scored before it existed; "
                        "re-score with data_tools.score to see the flags (and to use max_confident_wrong)."]
    t, cw = flag_threshold(sel.config), sel.cols["confident_wrong"]
    flagged, n, k = above(cw, t), len(sel.keep), int(sel.keep.sum())
    how = (f"`max_confident_wrong={t}` (the filter: flagged sequences were excluded before the policy ranked)"
           if sel.config["max_confident_wrong"] < 1 else
           f"{t}, a display threshold only (`max_confident_wrong=1.0`: the filter is off)")
    lines += ["A sequence is flagged when its `confident_wrong` share (positions where the SLM's top-1 probability "
              "is at least confident_threshold and the target is not its top-1: likely noise) is above "
              f"{how}.", "",
              f"- flagged among all: {int(flagged.sum())} of {n} ({flagged.mean():.1%})",
              f"- flagged among kept: {int((flagged & sel.keep).sum())} of {k} ({(flagged & sel.keep).sum() / k:.1%})"]
    if examples:
        rows = np.flatnonzero(flagged)
        rows = rows[np.lexsort((sel.cols["index"][rows], -cw[rows]))][:N_SHOWN]  # the most flagged first
        lines += ["", f"The {len(rows)} most flagged sequences:" if len(rows) else "No flagged sequence."]
        lines += _texts(sel, rows)
    return lines


def _fenced(text: str) -> list[str]:
    """`text` in a code fence longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _texts(sel: Selection, rows: np.ndarray) -> list[str]:
    """Each row's sequence index, scores and decoded text (or why the text is not shown)."""
    if not len(rows):
        return []
    if sel.texts.data is None:
        return ["", f"Sequence text not shown: {sel.texts.note}."]
    lines = []
    for r in rows:
        i = int(sel.cols["index"][r])
        values = {c: sel.cols[c][r] for c in ("confident_wrong", "mean_loss") if c in sel.cols}
        values.setdefault(sel.score_name, sel.score[r])
        stats = ", ".join(f"{c} {v:.4f}" for c, v in values.items())
        lines += ["", f"**sequence {i}** ({'kept' if sel.keep[r] else 'not kept'}; {stats}):", "",
                  *_fenced(sel.texts.get(i))]
    return lines


# ---- the documents ------------------------------------------------------------------------------------------------
def render_report(sel: Selection) -> str:
    settings = {x: y for x, y in sel.config.items() if x not in ("scores", "out_dir", "overwrite")}
    lines = [f"# Selection: {sel.config['policy']}", "", *_counts(sel),
             f"- policy score: `{sel.score_name}`; settings: `{json.dumps(settings)}`", "", *_table(sel), "",
             *_histograms(sel), "", *_flags(sel, examples=True)]
    return "\n".join(lines) + "\n"


def size_category(n: int) -> str:
    """The Hugging Face `size_categories` bucket of n rows."""
    bounds = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T"]
    for i, b in enumerate(bounds):
        if n < 1000 * 10**i:
            return f"{bounds[i - 1]}<n<{b}" if i else f"n<{b}"
    return "n>1T"


def render_card(sel: Selection) -> str:
    """The dataset card of the selected subset: HF front matter, then what it is, how it was chosen, its scores
    against the whole split, sample sequences, and the command that makes it again."""
    policy, k, n = sel.config["policy"], int(sel.keep.sum()), len(sel.keep)
    meta = {"pretty_name": f"slm_assist {policy} selection ({k:,} of {n:,} sequences)", "tags": CARD_TAGS,
            "size_categories": [size_category(k)], "task_categories": ["text-generation"]}
    rng = np.random.default_rng(0)  # the same samples every time
    kept_rows = np.flatnonzero(sel.keep)
    samples = np.sort(rng.choice(kept_rows, size=min(N_SHOWN, len(kept_rows)), replace=False))
    config = yaml.safe_dump(sel.config, sort_keys=False)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# Selected pretraining subset: {policy}", "",
             f"Sequences of the packed dataset `{sel.manifest.get('data', '?')}` (split "
             f"`{sel.manifest.get('split', '?')}`) that `data_tools.select` kept with policy `{policy}` (ranked by "
             f"`{sel.score_name}`), for the KD phase of SALT (`distill.data.selection`). The subset is `index.npy` "
             "(sorted int64 sequence indices into that split); `selection.json` is its summary.", "",
             "## Counts", "", *_counts(sel), "",
             "## Scores: kept vs all", "", *_table(sel), "", *_histograms(sel), "", *_flags(sel, examples=False), "",
             f"## Sample kept sequences (first {SNIPPET} characters)", *_texts(sel, samples), "",
             "## Reproduce", "", "Paths are relative to the directory select ran in.", "",
             "```bash", "cat > select.yaml <<'EOF'", config.rstrip(), "EOF",
             "python -m data_tools.select select.yaml", "```"]
    return "\n".join(lines) + "\n"


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


def write_figures(sel: Selection, out: Path) -> None:
    values = {**sel.cols, sel.score_name: sel.score}
    for name in plotted(sel):
        _plot(values[name], sel.keep, name, out / f"hist_{name}.png")
