"""Trainer tokens/s ÷ a plain PyTorch training loop's tokens/s: same model, batch, dtype, machine, one process.

    python bench/trainer_throughput.py [--rounds 6] [--steps 10] [--config configs/demo/llm.yaml] [key=value ...]

The trainer side is the real `Trainer.train_step` (DeepSpeed ZeRO-0 bf16 engine, Arrow batches, finite check).
The plain side is the standard PyTorch mixed-precision loop: fp32 weights, bf16 autocast, torch AdamW, grad clip.
Rounds alternate between the two so machine noise hits both alike; the ratio of medians is reported and written
to bench/results/trainer.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from pathlib import Path

import torch

from data_tools.pack import PrepareConfig, prepare
from slm_assist.core.config import load_config
from slm_assist.salt.recipe import RunConfig
from slm_assist.training.objective import CausalLMObjective
from slm_assist.training.optim import param_groups
from slm_assist.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def ensure_data(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        prepare(load_config(PrepareConfig, REPO / "configs/demo/data.yaml", [f"out_dir={path}", "overwrite=true"]))
    return path


# kernel / op name patterns of each kind, checked in this order; the rest is "other" (elementwise, norms, copies)
KINDS = {"gemm": re.compile(r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|cublas|nvjet|sm90_|linear", re.I),
         "attention": re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I),
         "optimizer": re.compile(r"adam|multi_tensor|foreach", re.I)}


def profile(step, steps: int, dev: torch.device) -> dict:
    """Share of device time (CPU time on CPU) by kind over `steps` steps, from the profiler's innermost events
    (kernels on CUDA, self time of ops on CPU), and the biggest events."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:  # kernels are the device-side events; CPU ops would double count
        events = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type.name == "CUDA"]
    else:
        events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    totals = {k: 0.0 for k in (*KINDS, "other")}
    by_name: dict[str, float] = {}
    for name, us in events:
        kind = next((k for k, pat in KINDS.items() if pat.search(name)), "other")
        totals[kind] += us
        by_name[name] = by_name.get(name, 0.0) + us
    total = sum(totals.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"share": {k: round(v / total, 4) for k, v in totals.items()}, "ms_per_step": round(total / steps / 1e3, 3),
            "meter": "CUDA kernel time" if cuda else "CPU op self time", "steps": steps,
            "top": [{"name": n[:120], "ms_per_step": round(us / steps / 1e3, 3)} for n, us in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs/demo/llm.yaml"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per round and side")
    ap.add_argument("--out", default=str(REPO / "bench/results/trainer.json"))
    ap.add_argument("--data", default=str(REPO / "runs/bench/data"),
                    help="packed dataset (made from the demo corpus with configs/demo/data.yaml when missing)")
    ap.add_argument("--profile", type=int, default=0,
                    help="then profile this many trainer steps: device time by kind (GEMM, attention, optimizer, other)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    data = ensure_data(Path(args.data))
    cfg = load_config(RunConfig, args.config, [f"data.path={data}", "run_dir=runs/bench/trainer", "train.dtype=bf16",
                                               "train.zero_stage=0", "checkpoint.resume=false", *args.overrides])
    trainer = Trainer(cfg, CausalLMObjective())
    dev = trainer.device
    plain = copy.deepcopy(trainer.model).float()
    opt = torch.optim.AdamW(param_groups(plain, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                            fused=dev.type == "cuda")  # the trainer uses DeepSpeed's FusedAdam on CUDA
    mb, seq = cfg.train.micro_batch_size, trainer.manifest["seq_len"]
    batch = torch.randint(0, len(trainer.tokenizer), (mb, seq), device=dev)

    def plain_step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = plain(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    timed(trainer.train_step, 3)  # warm-up both sides (allocator, first-call overheads)
    timed(plain_step, 3)
    t_trainer, t_plain = [], []
    for r in range(args.rounds):
        first, second = (trainer.train_step, plain_step) if r % 2 == 0 else (plain_step, trainer.train_step)
        a, b = timed(first, args.steps), timed(second, args.steps)
        (t_trainer, t_plain)[0 if r % 2 == 0 else 1].append(a)
        (t_plain, t_trainer)[0 if r % 2 == 0 else 1].append(b)
    tokens = mb * seq * cfg.train.grad_accum
    tps_trainer, tps_plain = tokens / statistics.median(t_trainer), tokens / statistics.median(t_plain)
    result = {
        "trainer_vs_plain_tokens_per_s": round(tps_trainer / tps_plain, 4),
        "trainer_tokens_per_s": round(tps_trainer, 1),
        "plain_tokens_per_s": round(tps_plain, 1),
        "model_params": trainer.n_params,
        "dtype": "bf16",
        "zero_stage": 0,
        "micro_batch_size": mb,
        "seq_len": seq,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    if args.profile:
        result["profile"] = profile(trainer.train_step, args.profile, dev)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
