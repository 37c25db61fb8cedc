"""Evaluate a save_pretrained model directory (with its tokenizer):

- a packed dataset directory (data_tools.pack output): token-level loss and perplexity on one split;
- a jsonl of {"context", "target"}: last-word cloze accuracy (LAMBADA-style: every target token is the greedy
  argmax given the context and the earlier target tokens; one teacher-forced forward per example);
- a jsonl of {"input", "choices", "label"}: multiple-choice accuracy, each choice scored by the log-likelihood
  of input + choice, optionally normalised by the choice's length in characters (lm-eval-harness's acc_norm).

    python -m slm_assist.eval MODEL_DIR [DATA ...] [--split validation] [--max-rows N] [--out results.json]

Only the tokenizer's real vocabulary is scored: padded embedding rows are cut off.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from slm_assist.core import dist
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_write_text
from slm_assist.core.model_dir import ModelDir
from slm_assist.core.tokenizer import tokenizer_fingerprint


def load_model(model_dir: str | Path, device: torch.device | None = None):
    """(model in eval mode, fp32, tokenizer) from a save_pretrained directory that holds its tokenizer."""
    d = ModelDir.open(model_dir)
    tok = d.tokenizer
    return d.load(device or dist.device(), len(tok), dtype=torch.float32).eval(), tok


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def dataset_loss(model, tok, data_dir: str | Path, split: str = "validation", batch_size: int = 8,
                 max_rows: int = -1) -> dict[str, Any]:
    """Mean next-token loss over every token of a packed split (each row scored on its own)."""
    data = PackedDataset.open(data_dir)
    data.check_tokenizer(tokenizer_fingerprint(tok), "the model",
                         "losses over different vocabularies are not comparable")
    ds = data.split(split, "--split")
    n = len(ds) if max_rows < 0 else min(len(ds), max_rows)
    v, total, count = len(tok), 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=f"loss {Path(data_dir).name}/{split}", unit="batch",
                      leave=False):
        ids = torch.from_numpy(np.asarray(ds[start : min(start + batch_size, n)]["input_ids"], dtype=np.int64))
        ids = ids.to(_device(model))
        logits = model(input_ids=ids).logits[:, :-1, :v].float()
        total += F.cross_entropy(logits.reshape(-1, v), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    loss = total / count
    return {"task": "loss", "data": str(data_dir), "split": split, "tokens": count, "loss": loss,
            "perplexity": math.exp(loss)}


def _split_ids(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where tokenizing the joined text stops matching the context
    alone: the continuation is scored exactly as the model would see it in running text."""
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    k = min(k, len(full) - 1)  # at least one continuation token
    # data_tools.pack puts EOS between documents, so a document starts after EOS in training: score it the same way
    return [tok.eos_token_id] + full[:k], full[k:]


def _continuation_logprobs(model, tok, context: str, continuation: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the continuation, and whether each token was the greedy argmax."""
    ctx, cont = _split_ids(tok, context, continuation)
    ids = (ctx + cont)[-max_len:]  # the context is cut from the left when too long
    x = torch.tensor([ids], device=_device(model))
    logp = model(input_ids=x).logits[0, -len(cont) - 1 : -1, : len(tok)].float().log_softmax(-1)
    target = x[0, -len(cont):]
    return logp.gather(-1, target[:, None]).squeeze(-1), logp.argmax(-1) == target


def _read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON: {e}") from None
            missing = [k for k in fields if k not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {missing}; expected {list(fields)}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def _max_len(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.inference_mode()
def cloze_accuracy(model, tok, path: str | Path, max_rows: int = -1) -> dict[str, Any]:
    """Fraction of {context, target} examples whose " target" is predicted greedily, token for token."""
    rows = _read_jsonl(path, ("context", "target"))[: max_rows if max_rows > 0 else None]
    hits, logps = 0, 0.0
    for r in tqdm(rows, desc=f"cloze {Path(path).name}", leave=False):
        lp, greedy = _continuation_logprobs(model, tok, r["context"], " " + r["target"], _max_len(model))
        hits += bool(greedy.all())
        logps += lp.sum().item()
    return {"task": "cloze", "data": str(path), "examples": len(rows), "accuracy": hits / len(rows),
            "mean_target_logprob": logps / len(rows)}


@torch.inference_mode()
def multiple_choice_accuracy(model, tok, path: str | Path, max_rows: int = -1) -> dict[str, Any]:
    """acc: argmax of log p(choice | input); acc_norm: of log p divided by the choice's length in characters."""
    rows = _read_jsonl(path, ("input", "choices", "label"))[: max_rows if max_rows > 0 else None]
    acc = acc_norm = 0
    for i, r in enumerate(tqdm(rows, desc=f"choice {Path(path).name}", leave=False)):
        if not isinstance(r["label"], int) or not 0 <= r["label"] < len(r["choices"]):
            raise UserError(f"{path}: example {i}: label {r['label']!r} is not an index into its "
                            f"{len(r['choices'])} choices")
        lls = [_continuation_logprobs(model, tok, r["input"], c, _max_len(model))[0].sum().item() for c in r["choices"]]
        acc += int(np.argmax(lls)) == r["label"]
        acc_norm += int(np.argmax([ll / max(1, len(c)) for ll, c in zip(lls, r["choices"])])) == r["label"]
    return {"task": "multiple_choice", "data": str(path), "examples": len(rows), "accuracy": acc / len(rows),
            "accuracy_norm": acc_norm / len(rows)}


def _kind(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "loss"
    if not p.is_file():
        raise UserError(f"{path}: no such file or directory")
    with open(p, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        keys = set(json.loads(first)) if first else set()
    except json.JSONDecodeError:
        keys = set()
    if {"context", "target"} <= keys:
        return "cloze"
    if {"input", "choices", "label"} <= keys:
        return "multiple_choice"
    raise UserError(f"{path}: neither a packed dataset directory nor a jsonl of {{context, target}} (cloze) or "
                    "{input, choices, label} (multiple choice)")


def evaluate(model_dir: str | Path, data: Sequence[str], split: str = "validation",
             max_rows: int = -1) -> dict[str, Any]:
    model, tok = load_model(model_dir)
    results = []
    for path in data:
        kind = _kind(path)
        if kind == "loss":
            results.append(dataset_loss(model, tok, path, split, max_rows=max_rows))
        elif kind == "cloze":
            results.append(cloze_accuracy(model, tok, path, max_rows))
        else:
            results.append(multiple_choice_accuracy(model, tok, path, max_rows))
    return {"model": str(model_dir), "results": results}


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m slm_assist.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("data", nargs="*", help="packed dataset dirs, cloze jsonl, multiple-choice jsonl")
    ap.add_argument("--split", default="validation", help="split of packed datasets (default: validation)")
    ap.add_argument("--max-rows", type=int, default=-1, help="cap sequences / examples per input (-1 = all)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(list(argv))
    res = evaluate(args.model_dir, args.data, args.split, args.max_rows)
    for r in res["results"]:
        figures = {k: v for k, v in r.items() if k not in ("task", "data")}
        print(f"{r['task']:>16}  {r['data']}: " + "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
