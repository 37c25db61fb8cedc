"""Evaluate a save_pretrained model directory (with its tokenizer):

- a packed dataset directory (data_tools.pack output): token-level loss and perplexity on one split;
- a jsonl of {"context", "target"}: last-word cloze accuracy (LAMBADA-style: every target token is the greedy
  argmax given the context and the earlier target tokens; one teacher-forced forward per example);
- a jsonl of {"input", "choices", "label"}: multiple-choice accuracy, each choice scored by the log-likelihood
  of input + choice, optionally normalised by the choice's length in characters (lm-eval-harness's acc_norm).

    python -m slm_assist.eval MODEL_DIR DATA [DATA ...] [--split validation] [--max-rows N] [--out results.json]
    python -m slm_assist.eval MODEL_DIR [DATA ...] --speed   # + batched tokens/s and generation latency

Only the tokenizer's real vocabulary is scored: padded embedding rows are cut off. A perplexity too large for a
float (mean loss above ~709.78 nats) is reported as inf; `--out` then writes it as `Infinity`, the JSON extension
that Python's `json` (and so `read_eval`, the report and the hub card) reads back as a float.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slm_assist.core import dist
from slm_assist.core.dataset import PackedDataset
from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.files import atomic_write_text, check_output_file
from slm_assist.core.model_dir import ModelDir
from slm_assist.core.run_dir import RunDir
from slm_assist.core.tokenizer import tokenizer_fingerprint
from slm_assist.training.objective import eval_loss

LOSS_VOCAB_WHY = "losses over different vocabularies are not comparable"


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
    check_max_rows(max_rows)
    data = PackedDataset.open(data_dir)
    data.check_tokenizer(tokenizer_fingerprint(tok), "the model", LOSS_VOCAB_WHY)
    ds = data.split(split, "--split")
    n = len(ds) if max_rows < 0 else min(len(ds), max_rows)
    batches = (torch.from_numpy(np.asarray(ds[start : min(start + batch_size, n)]["input_ids"], dtype=np.int64))
               for start in tqdm(range(0, n, batch_size), desc=f"loss {Path(data_dir).name}/{split}", unit="batch",
                                 leave=False))
    total, count = eval_loss(model, batches, len(tok), _device(model))
    if count == 0:
        raise UserError(f"{data_dir}: split {split!r} has no sequences to score")
    loss = total / count
    return {"task": "loss", "data": str(data_dir), "split": split, "tokens": count, "loss": loss,
            "perplexity": perplexity(loss)}


def perplexity(loss: float) -> float:
    """exp(mean loss), or inf where that is too large for a float (a mean loss above ~709.78 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def check_max_rows(max_rows: int) -> None:
    """`--max-rows`: -1 (every row) or a positive cap; 0 or another negative number would score nothing."""
    if max_rows != -1 and max_rows < 1:
        raise UserError(f"--max-rows {max_rows}: expected a positive number of sequences / examples per input, "
                        "or -1 for all")


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


TASKS = {"cloze": ("context", "target"), "multiple_choice": ("input", "choices", "label")}


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; a line that is not UTF-8 or not JSON is an error that
    names it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON: {e}") from None


def _expected(kind: str) -> str:
    return "{" + ", ".join(TASKS[kind]) + "}"


def _check_row(path: str | Path, lineno: int, row: Any, kind: str) -> None:
    """A row of a `kind` jsonl has every field, each of the right type."""
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: not a JSON object but {_short(row)}; expected {_expected(kind)}")
    missing = [k for k in TASKS[kind] if k not in row]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}; expected {list(TASKS[kind])}")
    for k in ("context", "target") if kind == "cloze" else ("input",):
        if not isinstance(row[k], str):
            raise UserError(f"{where}: field {k!r} must be a string, not {_short(row[k])}")
    if kind == "cloze":
        return
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise UserError(f"{where}: field 'choices' must be a list of at least 2 strings, not {_short(choices)}")
    bad = next((i for i, c in enumerate(choices) if not isinstance(c, str)), None)
    if bad is not None:
        raise UserError(f"{where}: field 'choices' must be a list of strings; choices[{bad}] is "
                        f"{_short(choices[bad])}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"{where}: field 'label' must be an integer index into its {len(choices)} choices "
                        f"(0..{len(choices) - 1}), not {_short(label)}")


def _read_jsonl(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """Every example of a cloze or multiple-choice jsonl, each checked (fields and their types)."""
    rows = []
    for lineno, row in _json_lines(path):
        _check_row(path, lineno, row, kind)
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def _max_len(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


@torch.inference_mode()
def cloze_accuracy(model, tok, path: str | Path, max_rows: int = -1) -> dict[str, Any]:
    """Fraction of {context, target} examples whose " target" is predicted greedily, token for token."""
    check_max_rows(max_rows)
    rows = _read_jsonl(path, "cloze")[: max_rows if max_rows > 0 else None]
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
    check_max_rows(max_rows)
    rows = _read_jsonl(path, "multiple_choice")[: max_rows if max_rows > 0 else None]
    acc = acc_norm = 0
    for r in tqdm(rows, desc=f"choice {Path(path).name}", leave=False):
        lls = [_continuation_logprobs(model, tok, r["input"], c, _max_len(model))[0].sum().item() for c in r["choices"]]
        acc += int(np.argmax(lls)) == r["label"]
        acc_norm += int(np.argmax([ll / max(1, len(c)) for ll, c in zip(lls, r["choices"])])) == r["label"]
    return {"task": "multiple_choice", "data": str(path), "examples": len(rows), "accuracy": acc / len(rows),
            "accuracy_norm": acc_norm / len(rows)}


def _kind(path: str) -> str:
    """What a DATA path is, from a look at it: a packed dataset directory, or a jsonl whose first example's
    fields say cloze or multiple choice. The rows themselves are checked when they are read."""
    p = Path(path)
    if p.is_dir():
        return "loss"
    if not p.is_file():
        raise UserError(f"{path}: no such file or directory")
    first = next(_json_lines(p), None)
    if first is None:
        raise UserError(f"{path}: no examples (an empty file)")
    lineno, row = first
    keys = set(row) if isinstance(row, dict) else set()
    overlap = {kind: len(keys & set(fields)) for kind, fields in TASKS.items()}
    kind = max(overlap, key=overlap.__getitem__)
    if overlap[kind]:  # the reader names any missing field
        return kind
    found = f"fields {sorted(keys)}" if isinstance(row, dict) else f"not a JSON object but {_short(row)}"
    raise UserError(f"{path}:{lineno}: {found}; expected a packed dataset directory or a jsonl of "
                    "{context, target} (cloze) or {input, choices, label} (multiple choice)")


def _check_input(path: str, split: str) -> tuple[str, PackedDataset | None]:
    """(kind, the opened packed dataset) of one DATA path; every row of a jsonl is read and checked."""
    kind = _kind(path)
    if kind != "loss":
        _read_jsonl(path, kind)
        return kind, None
    data = PackedDataset.open(path)
    if not data.has_split(split):
        raise UserError(f"--split={split!r}: {path} has no such split (splits: {list(data.manifest['splits'])})")
    return kind, data


def _no_data_message(model_dir: str | Path) -> str:
    msg = ("no DATA to evaluate on: give packed dataset directories (token loss and perplexity), jsonl files of "
           "{context, target} (cloze accuracy) or of {input, choices, label} (multiple-choice accuracy)")
    try:
        meta = ModelDir(model_dir).meta()
    except UserError:
        meta = None
    run_config = meta.get("run_config") if isinstance(meta, dict) else None
    run_data = run_config.get("data") if isinstance(run_config, dict) else None
    trained_on = run_data.get("path") if isinstance(run_data, dict) else None
    if isinstance(trained_on, str) and trained_on:  # recorded relative to the run directory (final/'s parent)
        trained_on = os.path.normpath(RunDir(Path(model_dir).absolute().parent).resolve(trained_on))
        where = "" if Path(trained_on).is_dir() else " (not found from here)"
        msg += (f"; this model was trained on {trained_on}{where}: "
                f"python -m slm_assist.eval {model_dir} {trained_on}")
    return msg


@torch.inference_mode()
def inference_speed(model, tok, batch: int = 8, seq_len: int = 256, new_tokens: int = 32,
                    repeats: int = 3) -> dict[str, Any]:
    """Batched forward tokens/s (best of `repeats`: machines are noisy, the best run is the least disturbed) and
    batch-1 greedy generation latency per new token (KV cache on), on fixed random tokens."""
    import time

    seq_len = min(seq_len, _max_len(model))
    ids = torch.randint(0, len(tok), (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(_device(model))
    model(input_ids=ids[:, :16])  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        best = min(best, time.perf_counter() - t0)
    prompt = ids[:1, : min(16, seq_len)]
    gen = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        gen = min(gen, time.perf_counter() - t0)
    return {"task": "speed", "data": "random tokens", "batch": batch, "seq_len": seq_len,
            "batched_tokens_per_s": batch * seq_len / best, "generate_ms_per_token": 1000 * gen / new_tokens}


def evaluate(model_dir: str | Path, data: Sequence[str], split: str = "validation",
             max_rows: int = -1, speed: bool = False) -> dict[str, Any]:
    """Every DATA path is checked (packed datasets: manifest, split, vocabulary; jsonl: every row) before the
    model is loaded."""
    check_max_rows(max_rows)
    d = ModelDir.open(model_dir)
    if not data and not speed:
        raise UserError(_no_data_message(model_dir))
    inputs = [(path, *_check_input(path, split)) for path in data]
    tok = d.tokenizer
    for _, _, packed in inputs:
        if packed is not None:
            packed.check_tokenizer(tokenizer_fingerprint(tok), "the model", LOSS_VOCAB_WHY)
            d.check_context(packed.seq_len, f"it cannot read the sequences of {packed.path}")
    model = d.load(dist.device(), len(tok), dtype=torch.float32).eval()
    results = []
    for path, kind, _ in inputs:
        if kind == "loss":
            results.append(dataset_loss(model, tok, path, split, max_rows=max_rows))
        elif kind == "cloze":
            results.append(cloze_accuracy(model, tok, path, max_rows))
        else:
            results.append(multiple_choice_accuracy(model, tok, path, max_rows))
    if speed:
        results.append(inference_speed(model, tok))
    return {"model": str(model_dir), "results": results}


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m slm_assist.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("data", nargs="*", help="packed dataset dirs, cloze jsonl, multiple-choice jsonl")
    ap.add_argument("--split", default="validation", help="split of packed datasets (default: validation)")
    ap.add_argument("--max-rows", type=int, default=-1, help="cap sequences / examples per input (-1 = all)")
    ap.add_argument("--out", default="", help="also write the results as JSON here (a perplexity too large for a "
                    "float is written as Infinity, which Python's json reads back as inf)")
    ap.add_argument("--speed", action="store_true",
                    help="also measure inference speed: batched forward tokens/s and batch-1 generation ms/token")
    args = ap.parse_args(list(argv))
    check_max_rows(args.max_rows)
    out = check_output_file(args.out, "--out") if args.out else None
    res = evaluate(args.model_dir, args.data, args.split, args.max_rows, args.speed)
    for r in res["results"]:
        figures = {k: v for k, v in r.items() if k not in ("task", "data")}
        print(f"{r['task']:>16}  {r['data']}: " + "  ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if out is not None:
        try:
            atomic_write_text(out, json.dumps(res, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"--out {out}: cannot write: {e}") from None


if __name__ == "__main__":
    run_cli(main)
