"""KD overhead benchmarks (issue 4), each measured side by side in one run:

1. step time with KD ÷ CE-only step time, same LLM, batch and machine, for the online SLM teacher (through full
   logits, and with distill.loss.fused_linear) and for the cached top-k soft labels, next to the FLOP-model limit
   1 + N_slm / (3 · N_llm). The steps are the real `Trainer.train_step` with the objective swapped; rounds
   alternate.
2. peak memory of the KD loss ÷ the CE-only loss at seq 2048 and vocab 32k (--memory-vocab adds e.g. 128k), forward
   + backward on [2048, V] logits: SALT's fused CE+KD chunked pass (what the trainer runs, auto chunk), CE + a
   separately chunked KD, and CE + unchunked KD; and from hidden states [2048, 2048] with the heads' weights,
   distill.loss.fused_linear against a CE step through the head's logits. Each variant in a fresh process, the peak
   above the inputs (CUDA max_memory_allocated on a GPU, peak RSS on CPU).

    python bench/kd_overhead.py [--rounds 6] [--steps 5] [--teacher DIR --llm key=value ... --score key=value ...]

Defaults to the demo data and SLM (made with the demo configs when missing); bench/salt.py and bench/gpu/verify.py
pass their own models. Writes bench/results/kd_overhead.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.score import main as score_main
from slm_assist.core.config import load_config
from slm_assist.core.scores import ScoresDir
from slm_assist.kd.fused_linear import fused_linear_ce_kd
from slm_assist.kd.losses import ce_plus_kd, chunk_tokens, kd_loss
from slm_assist.kd.sources import CachedSoftLabels, OnlineTeacher
from slm_assist.salt.objective import SALTObjective
from slm_assist.salt.recipe import RunConfig, build_trainer
from slm_assist.training.objective import CausalLMObjective

REPO = Path(__file__).resolve().parents[1]
DEMO_SLM = "runs/demo/slm/final"


def memory_probe(variant: str, vocab: int) -> None:
    """Child process: print the peak memory (MB) that one loss forward+backward adds on top of its inputs: CUDA
    max_memory_allocated on a GPU, peak RSS on CPU."""
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    n, v = 2048, vocab
    s = torch.randn(n, v, device=dev, requires_grad=True)
    t = torch.randn(n, v, device=dev)
    y = torch.randint(0, v, (n,), device=dev)
    s.grad = torch.zeros_like(s)  # the gradient buffer exists in every variant: count it as input
    if variant in ("ce_from_hidden", "fused_linear"):  # from hidden states [n, 2048] and a head [v, 2048]
        del s, t
        h = torch.randn(n, 2048, device=dev, requires_grad=True)
        w = torch.randn(v, 2048, device=dev, requires_grad=True)
        t_h, t_w = torch.randn(n, 1024, device=dev), torch.randn(v, 1024, device=dev)
        h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "ce":
        loss = F.cross_entropy(s, y)
    elif variant == "ce_from_hidden":  # what a CE-only step does: the head's logits, then CE
        loss = F.cross_entropy(h @ w.T, y)
    elif variant == "fused_linear":  # distill.loss.fused_linear: neither model's logits exist
        loss = fused_linear_ce_kd(h, w, t_h, t_w, y, 0.5, chunk=chunk_tokens(-1, v, cuda))[0]
    elif variant.startswith("salt_fused"):  # what SALTObjective runs: CE and KD in one chunked pass
        tail = variant.rsplit("_", 1)[1]
        chunk = chunk_tokens(-1 if tail == "auto" else int(tail), v, cuda)
        loss = ce_plus_kd(s, y, torch.full((n,), 0.5, device=dev), teacher_logits=t, chunk=chunk)[0]
    else:
        kd = kd_loss(s, t, chunk=0 if variant == "kd_unchunked" else 256)
        loss = 0.5 * F.cross_entropy(s, y) + 0.5 * kd
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print((peak - base) / 2**20)


def memory(args) -> dict:
    """Peak loss memory of each variant ÷ CE-only, per vocabulary, each variant in a fresh process."""
    out: dict = {"seq_len": 2048, "meter": "cuda max_memory_allocated" if torch.cuda.is_available() else
                 "peak RSS (CPU; noisy between processes)"}
    for vocab in (int(v) for v in args.memory_vocab.split(",")):
        mb = {}
        for variant in ("ce", "salt_fused_auto", "salt_fused_256", "salt_fused_1024", "kd_chunked", "kd_unchunked",
                        "ce_from_hidden", "fused_linear"):
            res = subprocess.run([sys.executable, __file__, "--memory-probe", variant, "--memory-vocab", str(vocab)],
                                 capture_output=True, text=True, check=True)
            mb[variant] = float(res.stdout.strip().splitlines()[-1])
        auto = chunk_tokens(-1, vocab, torch.cuda.is_available())
        out[f"vocab_{vocab}"] = {"peak_extra_mb": mb, "auto_chunk_tokens": auto,
                                 **{f"{k}_vs_ce": round(mb[k] / mb["ce"], 3) for k in mb
                                    if k not in ("ce", "ce_from_hidden", "fused_linear")},
                                 "fused_linear_vs_ce_from_hidden": round(mb["fused_linear"] / mb["ce_from_hidden"], 3)}
    return out


def step_time(args, llm_config: Path = REPO / "configs/demo/llm.yaml", llm_overrides: tuple[str, ...] = (),
              teacher: str = DEMO_SLM, score_overrides: tuple[str, ...] = (),
              work: Path = REPO / "runs/bench") -> dict:
    """Median step time of CE-only, online-KD and cached-KD steps on the same trainer, rounds alternating.
    The SALT recipe builds the trainer (online teacher, KD-phase subset); the other objectives reuse its teacher."""
    work.mkdir(parents=True, exist_ok=True)
    sel = work / "kd_index.npy"
    np.save(sel, np.arange(512))
    scores = work / "kd_cache"
    if not (scores / "manifest.json").is_file():
        score_main([str(REPO / "configs/demo/score.yaml"), f"model={teacher}", f"out_dir={scores}", "overwrite=true",
                    "cache.mode=top_k", "cache.k=32", f"cache.indices={sel}", *score_overrides])
    cfg = load_config(RunConfig, llm_config, [
        *llm_overrides, f"run_dir={work}/kd", "checkpoint.resume=false", "distill.source.kind=teacher",
        f"distill.source.teachers=[{teacher}]", "distill.schedule.kind=constant", f"distill.data.selection={sel}"])
    cached_cfg = load_config(RunConfig, llm_config, [*llm_overrides, "distill.source.kind=cache",
                                                     f"distill.source.caches=[{scores}]",
                                                     "distill.schedule.kind=constant"]).distill
    trainer = build_trainer(cfg)
    vocab, online = len(trainer.tokenizer), trainer.objective
    teacher = online.teacher
    cache = ScoresDir.open(scores, "distill.source.caches[0]").soft_labels(trainer.data.dataset)
    objectives = {
        "ce": CausalLMObjective(),
        "kd_online": SALTObjective(cfg.distill, OnlineTeacher(teacher), vocab, cfg.train.max_steps),
        "kd_cached": SALTObjective(cached_cfg, CachedSoftLabels(cache), vocab, cfg.train.max_steps),
        "kd_fused_linear": SALTObjective(dataclasses.replace(cfg.distill, loss=dataclasses.replace(
            cfg.distill.loss, fused_linear=True)), OnlineTeacher(teacher), vocab, cfg.train.max_steps, teacher=teacher),
    }

    stream, current = trainer.streams["kd"], [""]
    if stream.prefetches:  # as the recipe wires a cached run: labels read ahead with their batch, in that arm
        cached = objectives["kd_cached"].source
        stream.attach = lambda b: cached.attach(b) if current[0] == "kd_cached" else b

    def run(name: str) -> float:
        trainer.objective, current[0] = objectives[name], name
        trainer.streams["main"] = stream  # every arm reads the cached subset
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        return (time.perf_counter() - t0) / args.steps

    for name in objectives:
        run(name)  # warm-up
    times = {n: [] for n in objectives}
    for r in range(args.rounds):
        for n in (list(objectives) if r % 2 == 0 else list(objectives)[::-1]):
            times[n].append(run(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    n_llm = trainer.n_params
    n_slm = sum(p.numel() for p in teacher.parameters())
    return {"kd_step_ratio_online": round(med["kd_online"] / med["ce"], 4),
            "kd_step_ratio_cached": round(med["kd_cached"] / med["ce"], 4),
            "kd_step_ratio_fused_linear": round(med["kd_fused_linear"] / med["ce"], 4),
            "flop_limit": round(1 + n_slm / (3 * n_llm), 4), "llm_params": n_llm, "slm_params": n_slm,
            "ce_step_s": round(med["ce"], 4), "micro_batch": cfg.train.micro_batch_size,
            "seq_len": trainer.manifest["seq_len"], "rounds": args.rounds, "steps_per_round": args.steps,
            "cache": "top_k k=32", "device": str(trainer.device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--memory-probe", default="")
    ap.add_argument("--memory-vocab", default="32000", help="comma-separated vocabularies of the memory probes")
    ap.add_argument("--memory-only", action="store_true", help="only the memory probes")
    ap.add_argument("--skip-memory", action="store_true", help="only the step-time ratios")
    ap.add_argument("--teacher", default="", help="SLM model dir (default: the demo SLM, trained when missing)")
    ap.add_argument("--llm", action="append", default=[], help="key=value override of the LLM run config")
    ap.add_argument("--score", action="append", default=[], help="key=value override of the cache's scoring run")
    ap.add_argument("--work", default=str(REPO / "runs/bench"))
    ap.add_argument("--out", default=str(REPO / "bench/results/kd_overhead.json"))
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, int(args.memory_vocab))
        return
    if args.memory_only:
        result = {"memory": memory(args)}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    if not args.teacher:
        for cmd in (["data_tools.pack", "configs/demo/data.yaml", "overwrite=true"], ["slm_assist.train", "configs/demo/slm.yaml"]):
            target = REPO / ("runs/demo/data/manifest.json" if cmd[0] == "data_tools.pack" else f"{DEMO_SLM}/config.json")
            if not target.is_file():
                subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True)
    result = {} if args.skip_memory else {"memory": memory(args)}
    result["step_time"] = step_time(args, llm_overrides=tuple(args.llm), teacher=args.teacher or DEMO_SLM,
                                    score_overrides=tuple(args.score), work=Path(args.work))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
