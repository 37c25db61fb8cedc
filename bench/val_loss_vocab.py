"""val_loss before and after issue 24: the mean next-token loss of each finished run's exported model on the run's
own validation batches (config.yaml: data.path, train.eval_batches, train.micro_batch_size; one rank), with
the old Trainer definition (HF's labels loss: a softmax over every output row, padded ones included) and the one
definition that the Trainer, `slm_assist.eval` and SALT's handover now share (`training.objective.eval_loss`: the
tokenizer's real vocabulary only).

    python bench/val_loss_vocab.py [RUN_DIR ...]   # default: the demo's slm llm salt compress/tsd under runs/demo

Prints one markdown table row per run (fp32 on CPU); the run's last logged val_loss is shown for context.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from slm_assist.core.dataset import load_split
from slm_assist.core.run_dir import read_metrics
from slm_assist.eval import load_model
from slm_assist.training.batches import validation_batches
from slm_assist.training.objective import eval_loss


@torch.no_grad()
def padded_vocab_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """The Trainer's val_loss before issue 24: HF's mean labels loss over all output rows, weighted by tokens."""
    total = sum(model(input_ids=ids, labels=ids).loss.item() * ids[:, 1:].numel() for ids in batches)
    return total / sum(ids[:, 1:].numel() for ids in batches)


def measure(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    train = cfg["train"]
    batches = validation_batches(load_split(cfg["data"]["path"], "validation"), train["micro_batch_size"],
                                 train["eval_batches"], 0, 1)
    model, tok = load_model(run / "final", torch.device("cpu"))
    total, count = eval_loss(model, batches, len(tok), torch.device("cpu"))
    logged = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    return {"run": run, "data": cfg["data"]["path"], "tokens": count, "vocab": len(tok),
            "rows": model.get_output_embeddings().weight.shape[0], "old": padded_vocab_loss(model, batches),
            "new": total / count, "logged": logged[-1] if logged else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path,
                   default=[Path("runs/demo") / r for r in ("slm", "llm", "salt", "compress/tsd")])
    args = p.parse_args()
    print("| run | validation data, tokens | real vocab | output rows | old: padded vocab | new: real vocab | "
          "old − new | last logged val_loss (the run's dtype) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        if not (run / "final").is_dir():
            print(f"| {run} | (no final/, skipped) | | | | | | |")
            continue
        r = measure(run)
        print(f"| {run} | {r['data']}, {r['tokens']:,} | {r['vocab']} | {r['rows']} | {r['old']:.6f} | "
              f"{r['new']:.6f} | {r['old'] - r['new']:.2e} | {r['logged']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
