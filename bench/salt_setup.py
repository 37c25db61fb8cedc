"""The SALT benchmark's setup (bench/salt.py): per corpus, the packed data, the OOD set and cloze items, the SLMs,
their scores and the KD-phase subsets; and one training run, reused once finished, with its wall time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from parallel import LOCK, beside, run_module  # bench/parallel.py, next to this script
from salt_arms import STAGED, as_overrides

from data_tools.corpus import joined_documents, write_jsonl
from slm_assist.core.dataset import load_split
from slm_assist.core.files import atomic_write_text
from slm_assist.core.scores import ScoresDir
from slm_assist.eval import load_model

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
MAIN_CORPORA = {"pydoc": CORPORA / "train_pydoc.txt.gz", "linuxdoc": CORPORA / "train_linuxdoc.txt.gz"}
OOD_CORPUS = CORPORA / "train_perldoc.txt.gz"


def run(*cmd: str) -> None:
    run_module(REPO, *cmd)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def model_overrides(size: dict, p: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in size.items() if k != "lr"] + [
        f"optim.lr={size['lr']}", f"model.max_position_embeddings={p['seq']}"]


def train(run_dir: Path, p: dict, data: Path, size: dict, steps: int, seed: int, extra: dict,
          threads: int = 0) -> float:
    """Train one run (or reuse it when finished); returns the wall time its training took. `threads` > 0: a run
    side by side with others, with that many threads and its output in `run_dir`.log."""
    walls_file = run_dir.parent.parent / "wall_s.json"
    walls, key = read_json(walls_file), f"{run_dir.parent.name}/{run_dir.name}"
    if (run_dir / "final" / "config.json").is_file() and key in walls:
        return walls[key]
    t0 = time.time()
    sets = as_overrides(extra) + ([f"train.torch_threads={threads}"] if threads else [])
    run_module(REPO, "slm_assist.train", str(REPO / "configs/demo/llm.yaml"), f"run_dir={run_dir}",
               f"data.path={data}", f"seed={seed}", f"data.seed={seed}", f"train.max_steps={steps}",
               f"train.micro_batch_size={p['batch']}", f"train.eval_every={p['eval_every']}",
               f"train.eval_batches={p['eval_batches']}", f"schedule.warmup_steps={p['warmup']}",
               f"checkpoint.every={steps // 4}", *model_overrides(size, p), *sets,
               log=beside(run_dir, ".log") if threads else None)
    wall = round(time.time() - t0, 1)
    with LOCK:  # re-read: side-by-side runs share this file
        walls = read_json(walls_file)
        walls[key] = wall
        save_json(walls_file, walls)
    return wall


@torch.inference_mode()
def mean_target_prob(model_dir: Path, data: Path, rows: int = 64) -> float:
    """The SLM's mean probability of the true next token: 1 minus it sets the control's smoothing, so the
    smoothed one-hot is as soft as the SLM's labels on average."""
    model, tok = load_model(model_dir, torch.device("cpu"))
    ids = torch.tensor(np.asarray(load_split(data, "validation")[:rows]["input_ids"], dtype=np.int64))
    logp = model(input_ids=ids).logits[:, :-1, : len(tok)].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).exp().mean().item()


def prepare(corpus: str, p: dict, work: Path) -> dict:
    """The corpus packed (its own tokenizer, ~2000-char documents), the OOD corpus with that tokenizer, a cloze set
    from held-out documents, the SLM and its ensemble partners, the SLM's scores and the two KD-phase subsets."""
    w = work / corpus
    w.mkdir(parents=True, exist_ok=True)
    data, ood, cloze = w / "data", w / "ood", w / "cloze.jsonl"
    pack = [str(REPO / "configs/demo/data.yaml"), "overwrite=true", f"pack.seq_len={p['seq']}"]
    if not (data / "manifest.json").is_file():
        write_jsonl(w / "corpus.jsonl", joined_documents([MAIN_CORPORA[corpus]], p["corpus_chars"]))
        run("data_tools.pack", *pack, f"out_dir={data}", f"corpus.paths=[{w / 'corpus.jsonl'}]",
            f"tokenizer.vocab_size={p['vocab']}", f"pack.val_fraction={p['val_fraction']}")
    if not (ood / "manifest.json").is_file():
        write_jsonl(w / "ood.jsonl", joined_documents([OOD_CORPUS], p["ood_chars"]))
        run("data_tools.pack", *pack, f"out_dir={ood}", f"corpus.paths=[{w / 'ood.jsonl'}]",
            f"tokenizer.path={data / 'tokenizer'}", "pack.val_fraction=0.1")
    if not cloze.is_file():
        run("data_tools.cloze", str(data), str(cloze), "--examples", str(p["cloze"]))
    n = sum(1 for _ in cloze.open())
    if n < p["cloze"]:
        sys.exit(f"error: {cloze}: only {n} cloze items from the held-out documents, fewer than {p['cloze']}")
    slms = [w / "slm" / f"seed{s}" for s in range(p["ensemble"])]
    for s, d in enumerate(slms):
        train(d, p, data, p["slm"], p["slm_steps"], s, {})
    scores, select = w / "scores", {"salt_ds": w / "select_salt_ds", "cl": w / "select_cl"}
    if not (scores / "manifest.json").is_file():
        run("data_tools.score", str(REPO / "configs/demo/score.yaml"), f"model={slms[0] / 'final'}", f"data={data}",
            f"out_dir={scores}", "overwrite=true")
    if not (select["salt_ds"] / "index.npy").is_file():
        run("data_tools.select", str(REPO / "configs/demo/select.yaml"), f"scores={scores}",
            f"out_dir={select['salt_ds']}", "overwrite=true")
    flags = ScoresDir.open(scores, "scores").columns()["confident_wrong"]
    cl_cut = float(np.percentile(flags, 90))  # the 10% most confidently-wrong sequences are left out
    if not (select["cl"] / "index.npy").is_file():
        run("data_tools.select", str(REPO / "configs/demo/select.yaml"), f"scores={scores}", f"out_dir={select['cl']}",
            "overwrite=true", "policy=random", "fraction=1.0", f"max_confident_wrong={cl_cut!r}")
    eps_file = w / "ls_eps.json"
    if not eps_file.is_file():
        save_json(eps_file, {"eps": round(1 - mean_target_prob(slms[0] / "final", data), 3)})
    return {"corpus": corpus, "p": p, "work": w, "data": data, "ood": ood, "cloze": cloze,
            "slm": str(slms[0] / "final"), "slm_dir": slms[0], "ensemble": [str(d / "final") for d in slms[1:]],
            "scores": str(scores), "select": {k: str(v / "index.npy") for k, v in select.items()},
            "cl_cut": cl_cut, "cl_flagged": read_json(select["cl"] / "selection.json").get("flagged"),
            "eps": read_json(eps_file)["eps"], **{key: default for key, (_, _, default) in STAGED.items()}}
