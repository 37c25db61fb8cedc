"""`python -m slm_assist.report RUN_DIR [RUN_DIR ...]`: a table of finished runs (size, steps, validation loss)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slm_assist.errors import UserError
from slm_assist.metrics import read_metrics


def run_summary(run_dir: Path) -> dict:
    meta_path = run_dir / "final" / "slm_assist.json"
    if not meta_path.is_file():
        raise UserError(f"{run_dir}: no final/slm_assist.json; the run has not finished")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    vals = [r["val_loss"] for r in read_metrics(run_dir) if isinstance(r.get("val_loss"), float)]
    return {"run": str(run_dir), "params": meta["params"], "steps": meta["step"], "tokens": meta["tokens_seen"],
            "val_loss": vals[-1] if vals else None, "model": str(run_dir / "final")}


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise UserError("usage: python -m slm_assist.report RUN_DIR [RUN_DIR ...]")
    rows = [run_summary(Path(a)) for a in argv]
    print(f"{'run':<24} {'params':>8} {'steps':>6} {'tokens':>10} {'val_loss':>9}  model")
    for r in rows:
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{r['run']:<24} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['tokens']:>10} {vl:>9}  {r['model']}")


if __name__ == "__main__":
    from slm_assist.errors import run_cli

    run_cli(main)
