"""Publish an exported model on the Hugging Face hub, with a model card generated from its run metadata.

    python -m slm_assist.hub push RUN_DIR/final --repo-id ORG/NAME [--private] [--revision R] [--create-pr]
    python -m slm_assist.hub card RUN_DIR/final            # print the generated card, upload nothing

The token comes from HF_TOKEN (or `hf auth login`), the endpoint from --endpoint or HF_ENDPOINT. The folder is
uploaded with `huggingface_hub.upload_folder` from a staging copy (hard links), so the local folder is never
modified; its own README.md, when it has one, is uploaded instead of the generated card.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slm_assist.core.errors import UserError, run_cli
from slm_assist.core.model_dir import META, ModelDir
from slm_assist.salt.recipe import describe
from slm_assist.training.metrics import METRICS, read_eval, read_metrics


def _metrics_rows(model_dir: Path, meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    run_dir = model_dir.parent
    if (run_dir / METRICS).is_file():
        vals = [r["val_loss"] for r in read_metrics(run_dir) if isinstance(r.get("val_loss"), float)]
        if vals:
            rows.append(("validation loss (last training eval)", f"{vals[-1]:.4f}"))
    for r in read_eval(run_dir):
        if r["task"] == "loss":
            rows.append((f"loss / perplexity on `{Path(r['data']).name}` {r['split']}",
                         f"{r['loss']:.4f} / {r['perplexity']:.2f}"))
        elif r["task"] == "cloze":
            rows.append((f"last-word cloze accuracy (`{Path(r['data']).name}`, {r['examples']} items)",
                         f"{r['accuracy']:.3f}"))
        elif r["task"] == "multiple_choice":
            rows.append((f"multiple-choice accuracy / norm (`{Path(r['data']).name}`)",
                         f"{r['accuracy']:.3f} / {r['accuracy_norm']:.3f}"))
    for stage in meta.get("stages", []):
        for k, v in stage.get("metrics", {}).items():
            rows.append((f"{stage.get('name', 'stage')}: {k}", f"{v:.4f}" if isinstance(v, float) else str(v)))
    return rows


def model_card(model_dir: str | Path) -> str:
    """A hub model card (YAML metadata + markdown) from the run metadata that `slm_assist.train` exports."""
    d = Path(model_dir)
    meta = ModelDir(d).meta()
    if meta is None:
        raise UserError(f"{d}: no {META}; not a model exported by slm_assist.train (cannot write its card)")
    cfg, data = meta["run_config"], meta["data_manifest"]
    m, recipe = cfg["model"], describe(cfg)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- slm_assist", "- causal-lm", *[f"- {t}" for t in recipe.tags], "---", ""]
    lines += [f"# {Path(cfg['run_dir']).name}", "",
              f"A {meta['params'] / 1e6:.2f}M-parameter {m['model_type']} causal LM pretrained with "
              "slm_assist for "
              f"{meta['step']:,} steps ({meta['tokens_seen']:,} tokens).", "",
              "## Data", "",
              f"- sources: {', '.join(f'`{s}`' for s in data['sources'])}",
              f"- tokenizer: vocabulary {data['vocab_size']:,}, fingerprint `{data['tokenizer_fingerprint']}`",
              f"- packed into sequences of {data['seq_len']} tokens; "
              + ", ".join(f"{k}: {v['sequences']:,} sequences / {v['tokens']:,} tokens from {v['documents']:,} "
                          "documents" for k, v in data["splits"].items()),
              f"- validation held out by document (fraction {data['val_fraction']}, seed {data['seed']})", "",
              "## Training", "",
              f"- model: hidden {m['hidden_size']}, {m['num_layers']} layers, {m['num_heads']} heads, "
              f"FFN {m['ffn_size']}, context {m['max_position_embeddings']}",
              f"- optimiser: AdamW lr {cfg['optim']['lr']}, weight decay {cfg['optim']['weight_decay']}; "
              f"schedule {cfg['schedule']['kind']} with {cfg['schedule']['warmup_steps']} warmup steps",
              f"- batch: {cfg['train']['micro_batch_size']} × {cfg['train']['grad_accum']} accumulation per rank; "
              f"{cfg['train']['dtype']}, ZeRO-{cfg['train']['zero_stage']}; seed {cfg['seed']}", ""]
    if recipe.lines:
        lines += [f"## {recipe.title}", "", *recipe.lines, ""]
    for stage in meta.get("stages", []):
        lines += [f"## Stage: {stage.get('name', '?')}", "", stage.get("summary", ""), ""]
    rows = _metrics_rows(d, meta)
    if rows:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'tok = AutoTokenizer.from_pretrained("REPO_ID")',
              'model = AutoModelForCausalLM.from_pretrained("REPO_ID")', "```", ""]
    return "\n".join(lines)


def push(model_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, endpoint: str | None = None, token: str | None = None) -> str:
    """Upload the folder (plus a generated card) to `repo_id`; returns the commit (or PR) URL."""
    from httpx2 import TransportError  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    d = ModelDir.open(model_dir).path
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise UserError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    api = HfApi(endpoint=endpoint, token=token)
    if not (token or get_token()):
        raise UserError("no Hugging Face token: set HF_TOKEN (or run `hf auth login`) before pushing")
    card = None if (d / "README.md").is_file() else model_card(d).replace("REPO_ID", repo_id)
    try:
        with tempfile.TemporaryDirectory(prefix="slm_assist_push_") as tmp:
            stage = Path(tmp) / d.name
            shutil.copytree(d, stage, copy_function=_link_or_copy)
            if card is not None:
                (stage / "README.md").write_text(card, encoding="utf-8")
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=stage, revision=revision, create_pr=create_pr,
                                     commit_message=f"Upload {d.parent.name} (slm_assist)")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise UserError(f"hub {endpoint} rejected the push of {d} to {repo_id} (HTTP {status}): "
                        f"{str(e).splitlines()[0]}; the local folder is unchanged") from None
    except (OSError, ValueError) as e:
        raise UserError(f"push of {d} to {repo_id} via {endpoint} failed: {type(e).__name__}: {e}; "
                        "the local folder is unchanged") from None
    except TransportError as e:  # connection refused, DNS, timeouts: the hub was never reached
        raise UserError(f"hub endpoint {endpoint} is unreachable ({type(e).__name__}: {e}); "
                        "check HF_ENDPOINT / --endpoint; the local folder is unchanged") from None
    return info.pr_url or info.commit_url


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m slm_assist.hub", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="upload a save_pretrained folder with a generated model card")
    p.add_argument("model_dir")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--endpoint", default=None, help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    c = sub.add_parser("card", help="print the generated model card")
    c.add_argument("model_dir")
    args = ap.parse_args(list(argv))
    if args.cmd == "card":
        print(model_card(args.model_dir))
        return
    url = push(args.model_dir, args.repo_id, args.private, args.revision, args.create_pr, args.endpoint)
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


if __name__ == "__main__":
    run_cli(main)
