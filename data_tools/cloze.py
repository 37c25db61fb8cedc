"""Build a last-word cloze set from the held-out (validation) documents of a packed dataset: each example is the
text before a sentence-final word and that word, LAMBADA-style. Evaluate it with `python -m slm_assist.eval`.

    python -m data_tools.cloze DATA_DIR OUT.jsonl [--examples 500] [--context-chars 1000] [--seed 0]

The documents are re-read with the dataset's own prepare_config.yaml and split exactly as data_tools.pack split
them, so no example comes from a training document.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_tools.corpus import read_documents
from data_tools.pack import PrepareConfig, is_validation_doc
from slm_assist.core.config import load_config
from slm_assist.core.dataset import PREPARE_CONFIG, read_manifest
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_write_text, check_output_file

# a word of >= 3 letters that ends a sentence: "... returns the value." -> "value"
_FINAL_WORD = re.compile(r"(?<=\s)([A-Za-z][a-z]{2,})\.(?=\s|$)")


def cloze_examples(docs: Iterable[str], context_chars: int = 1000, min_context_chars: int = 100) -> list[dict]:
    """Every sentence-final word with at least `min_context_chars` of text before it in its document that also
    occurs in that text. LAMBADA keeps items that need the wider context in the same spirit: without the filter
    most targets are unguessable and small models all score ~0, which measures nothing."""
    out = []
    for doc in docs:
        for m in _FINAL_WORD.finditer(doc):
            start = m.start(1)
            ctx = doc[max(0, start - context_chars) : start].rstrip()
            if start > context_chars:  # begin at a word boundary
                ctx = ctx[ctx.find(" ") + 1 :] if " " in ctx else ctx
            if len(ctx) >= min_context_chars and re.search(rf"\b{m.group(1)}\b", ctx):
                out.append({"context": ctx, "target": m.group(1)})
    return out


def build(data_dir: str | Path, examples: int, context_chars: int, seed: int) -> list[dict]:
    manifest = read_manifest(data_dir)
    if not manifest.get("val_fraction"):
        raise UserError(f"{data_dir}: packed with val_fraction=0; there are no held-out documents to build from")
    cfg = load_config(PrepareConfig, Path(data_dir) / PREPARE_CONFIG)
    held_out = (d for i, d in enumerate(read_documents(cfg.corpus))
                if is_validation_doc(i, manifest["seed"], manifest["val_fraction"]))
    candidates = cloze_examples(held_out, context_chars)
    if not candidates:
        raise UserError(f"{data_dir}: the held-out documents have no sentence-final words to build cloze items from")
    random.Random(seed).shuffle(candidates)
    return candidates[:examples]


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_tools.cloze", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("out")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--context-chars", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(list(argv))
    check_output_file(args.out, "out")
    if args.examples <= 0:
        raise UserError(f"--examples={args.examples}: expected > 0")
    rows = build(args.data_dir, args.examples, args.context_chars, args.seed)
    atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} cloze examples to {args.out}")


if __name__ == "__main__":
    run_cli(main)
