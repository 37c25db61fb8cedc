"""Scoring benchmarks (issue 3), each a ratio measured side by side in one process:

1. scoring tokens/s ÷ bare forward-pass tokens/s: same SLM, batches, dtype (target ≥ 0.90). The scoring side is
   the real `Scorer.score_shard` (forward, scores, Arrow write); the bare side reads the same batches and runs
   `model(input_ids).logits` under inference_mode. Measured for the demo SLM and for a random-init ~26M-param
   scorer (the per-token scoring cost is fixed by the vocabulary, so the ratio rises with model size).
2. soft-label cache: bytes per token for top_k (k=8, 32) and sampled (n=32), on disk and by formula, and the
   cache-writing overhead (scoring time with the cache ÷ without).
3. on a real corpus (default: ../shared/corpora/train_perldoc.txt.gz when present, a domain the demo SLM did
   not train on): score distributions, and how the SALT_DS subset overlaps the ppl_band subsets.

    python bench/score_throughput.py [--rounds 4] [--rows 512] [--corpus PATH] [--max-docs 20000]

Needs the demo SLM and data (runs/demo/{slm,data}); they are made with the demo configs when missing.
Writes bench/results/score.json and bench/results/score_real_corpus.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_tools.pack import PrepareConfig, prepare
from data_tools.score import ScoreConfig, Scorer, shard_rows
from data_tools.score import main as score_main
from data_tools.select import SelectConfig, select
from slm_assist.core.config import load_config
from slm_assist.core.dataset import read_manifest
from slm_assist.core.scores import ScoresDir
from slm_assist.core.tokenizer import load_tokenizer
from slm_assist.training.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]


class _NoBar:
    def update(self, n: int) -> None:
        pass


def ensure_demo() -> None:
    if not (REPO / "runs/demo/data/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "data_tools.pack", "configs/demo/data.yaml", "overwrite=true"], cwd=REPO, check=True)
    if not (REPO / "runs/demo/slm/final/config.json").is_file():
        subprocess.run([sys.executable, "-m", "slm_assist.train", "configs/demo/slm.yaml"], cwd=REPO, check=True)


DEMO_DATA = REPO / "runs/demo/data"


def random_model(hidden: int, layers: int, ffn: int, data: Path = DEMO_DATA, kv_heads: int = -1) -> Path:
    """A random-init Llama with `data`'s tokenizer (throughput does not depend on trained weights)."""
    seq, vocab = read_manifest(data)["seq_len"], read_manifest(data)["vocab_size"]
    out = REPO / ("runs/bench/" + f"scorer_h{hidden}_l{layers}" + ("" if data == DEMO_DATA else f"_v{vocab}_s{seq}"))
    if not (out / "config.json").is_file():
        tok = load_tokenizer(data / "tokenizer")
        torch.manual_seed(0)
        cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, ffn_size=ffn,
                          num_kv_heads=kv_heads, max_position_embeddings=seq)
        build_model(cfg, tok, torch.device("cpu")).save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return out


def realistic_data(tiny: bool) -> Path:
    """The demo corpus packed with a 32k BPE at seq 2048 (the tiny variant: 4k at seq 256), for a scorer of
    realistic shape."""
    vocab, seq = (4096, 256) if tiny else (32000, 2048)
    data = REPO / f"runs/bench/data_v{vocab}_s{seq}"
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "data_tools.pack", "configs/demo/data.yaml", f"out_dir={data}",
                        "overwrite=true", f"tokenizer.vocab_size={vocab}", f"pack.seq_len={seq}"], cwd=REPO, check=True)
    return data


def throughput(args, model_dir: Path, with_cache: bool, data: Path = DEMO_DATA) -> dict:
    n_shards = max(1, read_manifest(data)["splits"]["train"]["sequences"] // args.rows)
    variants = {"plain": []}
    if with_cache:
        variants.update({"top_k_8": ["cache.mode=top_k", "cache.k=8"], "top_k_32": ["cache.mode=top_k", "cache.k=32"],
                         "sampled_32": ["cache.mode=sampled", "cache.samples=32"]})
    scorers = {name: Scorer(load_config(ScoreConfig, REPO / "configs/demo/score.yaml", [
        f"model={model_dir}", f"data={data}", f"out_dir={REPO / 'runs/bench/score' / name}", f"num_shards={n_shards}",
        "dtype=bf16", "torch_threads=0", *extra])) for name, extra in variants.items()}
    plain = scorers["plain"]
    model, _, device = plain.load_models()
    rows = shard_rows(len(plain.ds), plain.cfg.batch_size, n_shards, 0)
    bs = plain.cfg.batch_size

    @torch.inference_mode()
    def bare() -> None:
        for start in range(rows.start, rows.stop, bs):
            idx = np.arange(start, min(start + bs, rows.stop))
            ids = torch.from_numpy(np.asarray(plain.ds[idx]["input_ids"], dtype=np.int64)).to(device)
            _ = model(input_ids=ids).logits

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    runs = {"bare": bare, **{n: (lambda s=s: s.score_shard(0, model, None, device, _NoBar())) for n, s in scorers.items()}}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(args.rounds):
        for n in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[n].append(timed(runs[n]))
    med = {n: statistics.median(v) for n, v in times.items()}
    tokens = len(rows) * plain.data.manifest["seq_len"]
    positions = len(rows) * (plain.data.manifest["seq_len"] - 1)
    result = {
        "scoring_vs_forward_tokens_per_s": round(med["bare"] / med["plain"], 4),
        "forward_tokens_per_s": round(tokens / med["bare"], 1),
        "scoring_tokens_per_s": round(tokens / med["plain"], 1),
        "model_params": sum(p.numel() for p in model.parameters()),
        "rows_per_round": len(rows), "rounds": args.rounds, "batch_size": bs, "dtype": "bf16",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    if with_cache:
        result["cache_bytes_per_token"] = {
            n: round(sum(f.stat().st_size for f in (s.shard_dir(0) / "cache").rglob("*.arrow")) / positions, 2)
            for n, s in scorers.items() if n != "plain"}
        result["cache_write_overhead"] = {n: round(med[n] / med["plain"], 4) for n in result["cache_bytes_per_token"]}
    return result


def real_corpus(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    corpus = Path(args.corpus)
    if not corpus.is_file():
        return {"skipped": f"{corpus} not found"}
    data = REPO / "runs/bench/real_data"
    prepare(load_config(PrepareConfig, None, [
        f"out_dir={data}", "overwrite=true", f"corpus.paths=[{corpus}]", f"corpus.max_docs={args.max_docs}",
        f"tokenizer.path={REPO / 'runs/demo/data/tokenizer'}", "pack.seq_len=256", "pack.val_fraction=0.0"]))
    out = REPO / "runs/bench/real_scores"
    score_main([str(REPO / "configs/demo/score.yaml"), f"data={data}", f"out_dir={out}", "overwrite=true"])
    cols = ScoresDir.open(out, "scores").columns()
    sets = {}
    for name, over in {"salt_ds_top50": ["policy=salt_ds"], "ppl_low50": ["policy=ppl_band", "ppl_band=low"],
                       "ppl_middle50": ["policy=ppl_band", "ppl_band=middle"],
                       "ppl_high50": ["policy=ppl_band", "ppl_band=high"]}.items():
        keep = select(cols, load_config(SelectConfig, None, ["fraction=0.5", *over]))
        sets[name] = set(cols["index"][keep].tolist())
    salt = sets["salt_ds_top50"]
    overlap = {k: round(len(salt & v) / len(salt), 4) for k, v in sets.items() if k != "salt_ds_top50"}
    finite = np.isfinite(cols["salt_ds"])
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = float(np.corrcoef(rank(cols["salt_ds"][finite]), rank(cols["mean_loss"][finite]))[0, 1])

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, name in zip(axes[:2], ("mean_loss", "salt_ds")):
        ax.hist(cols[name][np.isfinite(cols[name])], bins=60, color="#1f77b4")
        ax.set_xlabel(name)
        ax.set_ylabel("sequences")
    axes[2].scatter(cols["mean_loss"][finite], cols["salt_ds"][finite], s=2, alpha=0.3)
    axes[2].set_xlabel("mean_loss")
    axes[2].set_ylabel("salt_ds")
    axes[2].set_title(f"Spearman {spearman:.2f}")
    fig.suptitle(f"demo SLM scores on {corpus.name} ({len(cols['index'])} sequences of 256)")
    fig.tight_layout()
    fig.savefig(REPO / "bench/results/score_real_corpus.png", dpi=100)
    plt.close(fig)
    summary = {name: {"mean": float(np.nanmean(v)), "p10": float(np.nanpercentile(v, 10)),
                      "p50": float(np.nanpercentile(v, 50)), "p90": float(np.nanpercentile(v, 90))}
               for name, v in cols.items() if name != "index"}
    return {"corpus": corpus.name, "sequences": len(cols["index"]), "salt_ds_nan": int((~finite).sum()),
            "distributions": summary, "salt_ds_top50_overlap_with": overlap,
            "spearman_salt_ds_vs_mean_loss": round(spearman, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", type=int, default=512, help="sequences per timed round")
    ap.add_argument("--corpus", default=str(REPO.parent / "shared/corpora/train_perldoc.txt.gz"))
    ap.add_argument("--max-docs", type=int, default=20000)
    ap.add_argument("--out", default=str(REPO / "bench/results/score.json"))
    ap.add_argument("--throughput-only", action="store_true",
                    help="random-init scorers of the demo SLM's size and larger, no training, no real corpus (GPU check)")
    ap.add_argument("--realistic", choices=("full", "tiny"), default="",
                    help="only a scorer of realistic shape: ~0.27B (d 1024, 16 layers, GQA 16/4), vocab 32k, seq 2048, "
                    "random init (tiny: a CPU smoke test of the same path)")
    args = ap.parse_args()
    if args.realistic:
        data = realistic_data(args.realistic == "tiny")
        size = dict(hidden=128, layers=2, ffn=256) if args.realistic == "tiny" else dict(hidden=1024, layers=16, ffn=2816)
        result = throughput(args, random_model(**size, data=data, kv_heads=4 if args.realistic == "full" else -1),
                            with_cache=True, data=data)
    elif args.throughput_only:
        if not (REPO / "runs/demo/data/manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "data_tools.pack", "configs/demo/data.yaml", "overwrite=true"], cwd=REPO, check=True)
        small = throughput(args, random_model(hidden=128, layers=4, ffn=384), with_cache=True)
        result = {**small, "larger_scorer": throughput(args, random_model(hidden=512, layers=8, ffn=1376), with_cache=False)}
    else:
        ensure_demo()
        demo_slm = throughput(args, REPO / "runs/demo/slm/final", with_cache=True)
        bigger = throughput(args, random_model(hidden=512, layers=8, ffn=1376), with_cache=False)
        result = {**demo_slm, "larger_scorer": bigger, "real_corpus": real_corpus(args)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
