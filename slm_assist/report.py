"""Reports on finished runs.

    python -m slm_assist.report RUN_DIR [RUN_DIR ...]                      # a table on stdout
    python -m slm_assist.report RUN_DIR ... --out REPORT.md [--data DIR] [--select DIR] [--title T]
    python -m slm_assist.report --compress COMPRESS_RUN_DIR [--scratch RUN_DIR] [--out REPORT.md]

With --out it writes (or updates) a markdown report: with --data the packed dataset; a table of the runs (size,
steps, tokens, validation loss, and the figures of `RUN_DIR/eval.json` from `python -m slm_assist.eval --out`);
a PNG of their loss curves; with --select, the data_tools.select summary and score histograms; with --compress, a
slm_assist.compress run: teacher, student from scratch (--scratch RUN_DIR) and compressed student, and its stages.
The report is made of named sections: a later stage adds its own with `write_section` without touching the others.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from slm_assist.compress.report import compress_figures, compress_section, compress_summary
from slm_assist.core.dataset import read_manifest
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_write_text, check_output_file
from slm_assist.core.run_dir import RunDir
from slm_assist.core.selection import INDEX, SUMMARY, read_summary
from slm_assist.recipes import describe


def run_summary(run_dir: Path) -> dict:
    """A finished run's figures; without metrics.jsonl (logging off, or lost) its val_loss is None."""
    run = RunDir.open(run_dir, "RUN_DIR")
    meta = run.meta()
    vals = run.val_losses()
    evals = {r["task"]: r for r in run.eval_results()}
    return {"run": str(run_dir), "name": run_dir.name, "params": meta["params"], "steps": meta["step"],
            "tokens": meta["tokens_seen"], "val_loss": vals[-1] if vals else None, "model": str(run.final),
            "recipe": describe(meta, run.path).short, "eval": evals}


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def write_section(report: Path, name: str, markdown: str, title: str = "slm_assist report") -> None:
    """Insert or replace the section `name` of a markdown report, keeping every other section as it was."""
    begin, end = _section_markers(name)
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = report.read_text(encoding="utf-8") if report.is_file() else f"# {title}\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    atomic_write_text(report, text)


def plot_curves(runs: Sequence[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        recs = RunDir(run).metrics()  # [] for a run without metrics.jsonl: not drawn
        train = [(r["step"], r["ce"] if "ce" in r else r["loss"]) for r in recs
                 if "loss" in r and _number(r["ce"] if "ce" in r else r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in recs if _number(r.get("val_loss"))]
        if train:
            ax_t.plot(*zip(*train), label=run.name, lw=1)
        if val:
            ax_v.plot(*zip(*val), marker="o", ms=3, label=run.name)
        kd = [r["step"] for r in recs if r.get("kd_phase") == 1.0]
        if kd:
            ax_v.axvspan(0, max(kd), alpha=0.08, color="tab:green")
    ax_t.set(title="training CE", xlabel="step", ylabel="loss")
    ax_v.set(title="validation loss (shaded: KD phase)", xlabel="step", ylabel="loss")
    for a in (ax_t, ax_v):
        if a.get_legend_handles_labels()[0]:
            a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def runs_section(runs: Sequence[Path], out_dir: Path) -> str:
    rows = [run_summary(r) for r in runs]
    plot_curves(runs, out_dir / "loss_curves.png")
    lines = ["## Training runs", "",
             "| run | params | steps | tokens | val loss (last eval) | val loss (full split) | perplexity | "
             "cloze acc | recipe |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss, cloze = r["eval"].get("loss", {}), r["eval"].get("cloze", {})
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens']:,} | {_fmt(r['val_loss'])} "
                     f"| {_fmt(loss.get('loss'))} | {_fmt(loss.get('perplexity'), '.1f')} | "
                     f"{_fmt(cloze.get('accuracy'), '.3f')} | {r['recipe']} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def data_section(data_dir: Path) -> str:
    m = read_manifest(data_dir)
    lines = ["## Data", "", f"`{data_dir}`: {', '.join(m['sources'])}; tokenizer vocabulary {m['vocab_size']:,} "
             f"(fingerprint `{m['tokenizer_fingerprint']}`), sequences of {m['seq_len']} tokens.", "",
             "| split | documents | sequences | tokens |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['documents']:,} | {v['sequences']:,} | {v['tokens']:,} |" for k, v in m["splits"].items()]
    return "\n".join(lines) + "\n"


def selection_section(select_dir: Path, out_dir: Path) -> str:
    sel = read_summary(select_dir / INDEX)
    lines = ["## Data selection", "",
             f"Policy `{sel.get('policy')}` kept {sel.get('kept'):,} of {sel.get('total'):,} sequences "
             f"(`{select_dir}/{INDEX}`). Full table: `{select_dir}/report.md`.", ""]
    for png in sorted(select_dir.glob("hist_*.png")):
        if out_dir.resolve() != select_dir.resolve():
            shutil.copyfile(png, out_dir / f"select_{png.name}")
        lines.append(f"![{png.stem}](select_{png.name})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m slm_assist.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, help="write/update this markdown report (PNGs next to it)")
    ap.add_argument("--data", type=Path, help="a packed dataset dir to describe")
    ap.add_argument("--select", type=Path, help="a data_tools.select output dir to include")
    ap.add_argument("--compress", type=Path, help="a slm_assist.compress run dir to include")
    ap.add_argument("--scratch", type=Path, help="with --compress: the same-shape student trained from scratch")
    ap.add_argument("--title", default="slm_assist report")
    args = ap.parse_args(list(argv))
    if not args.runs and not args.compress:
        ap.error("give at least one RUN_DIR, or --compress")
    if args.scratch and not args.compress:
        ap.error("--scratch needs --compress")
    rows = [run_summary(r) for r in args.runs]
    if args.data:
        read_manifest(args.data)
    if args.select and read_summary(args.select / INDEX) is None:
        raise UserError(f"--select {args.select}: no {SUMMARY} (not a data_tools.select output)")
    compress = compress_figures(args.compress, args.scratch) if args.compress else None
    if args.out:
        check_output_file(args.out, "--out")
    if rows:
        print(f"{'run':<24} {'params':>8} {'steps':>6} {'tokens':>10} {'val_loss':>9}  model")
    for r in rows:
        print(f"{r['run']:<24} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['tokens']:>10} "
              f"{_fmt(r['val_loss']):>9}  {r['model']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # the PNGs go next to it
        if args.data:
            write_section(args.out, "data", data_section(args.data), args.title)
        if args.select:
            write_section(args.out, "selection", selection_section(args.select, args.out.parent), args.title)
        if rows:
            write_section(args.out, "runs", runs_section(args.runs, args.out.parent), args.title)
        if compress:
            write_section(args.out, "compress", compress_section(compress, args.out.parent), args.title)
        print(f"report: {args.out}")
    if compress:
        print(compress_summary(compress))


if __name__ == "__main__":
    run_cli(main)
