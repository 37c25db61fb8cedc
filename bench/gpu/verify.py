"""Issue 14: the GPU figures in one fail-soft run. Each stage's result is appended to a JSONL file and merged into
the JSON the moment it ends, so a failure or a timeout loses only the stage it hit.

Stages, most wanted first:
  mfu                   trainer MFU on a ~1.0B Llama (2048 x 22, GQA 16/4, ffn 5632), seq 2048, micro-batch 8, ZeRO-1
  trainer_vs_plain_1b   trainer tokens/s ÷ a plain PyTorch loop, same 1B, micro-batch 4, ZeRO-0; with a profile
                        of trainer steps by kind (GEMM / attention / optimizer / other)
  kd                    KD step ÷ CE step, 1B student + ~0.25B teacher, online and cached top-k, and the FLOP limit
  scoring               data_tools.score ÷ a bare forward pass on a realistic scorer (~0.27B, vocab 32k, seq 2048)
  kd_memory             KD loss peak ÷ CE-only peak at seq 2048, vocab 32k and 128k (CUDA max_memory_allocated)
  ce_path               CE-only loss from hidden states: materialised logits vs our fused-linear pass vs Liger's
                        fused linear CE (when liger-kernel is installed), time and peak memory at vocab 32k, 128k
  trainer_vs_plain_88m  the same ratio on a ~110M model at seq 256
  optimizer             trainer tokens/s with torch's fused AdamW ÷ DeepSpeed's FusedAdam, on the 1B
  attention, zero       attn auto vs sdpa losses; ZeRO-1 vs ZeRO-2 bf16 losses (issue 6's checks, kept)

    bash bench/gpu/verify.sh                       # on the GPU machine: every stage -> $OUT/gpu.json, gpu.jsonl
    python bench/gpu/verify.py --tiny              # CPU smoke test with tiny models (numbers meaningless)
    python bench/gpu/verify.py --stages kd,scoring # some stages; --resume keeps the stages gpu.json already has

gpu.json always carries the keys mfu, trainer_vs_plain_1b, trainer_vs_plain_88m, scoring_vs_forward_realistic,
kd_step_ratio_online, kd_step_ratio_cached, flop_limit, kd_loss_mem_ratio_32k, kd_loss_mem_ratio_128k (null until
measured), the device, versions and date, and per stage its details or its error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from slm_assist.core.files import atomic_write_text
from slm_assist.core.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[2]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts (the PCIe H100 is 756)
KEYS = ("mfu", "trainer_vs_plain_1b", "trainer_vs_plain_88m", "scoring_vs_forward_realistic", "kd_step_ratio_online",
        "kd_step_ratio_cached", "flop_limit", "kd_loss_mem_ratio_32k", "kd_loss_mem_ratio_128k")

SIZES = {  # ~1.0B, ~0.25B and ~110M Llamas, and tiny stand-ins for the CPU smoke test
    "llm": ["model.hidden_size=2048", "model.num_layers=22", "model.num_heads=16", "model.num_kv_heads=4",
            "model.ffn_size=5632"],
    "slm": ["model.hidden_size=1024", "model.num_layers=16", "model.num_heads=8", "model.num_kv_heads=4",
            "model.ffn_size=2816"],
    "mid": ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.ffn_size=2048"],
    "llm_tiny": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=128"],
    "slm_tiny": ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.ffn_size=64"],
    "mid_tiny": ["model.hidden_size=48", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=96"],
}


class StageError(RuntimeError):
    pass


def sh(*cmd: str, module: bool = True) -> str:
    """Run a python module (or script) from the repo root; a failure raises with the output's tail."""
    print("+ " + " ".join(cmd), flush=True)
    res = subprocess.run([sys.executable, *(["-m"] if module else []), *cmd], cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        raise StageError(f"exit {res.returncode}: {' '.join(cmd)}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}")
    return res.stdout


def train(run: Path, data: Path, extra: list[str]) -> list[dict]:
    sh("slm_assist.train", "configs/demo/llm.yaml", f"run_dir={run}", f"data.path={data}", "checkpoint.resume=false",
       "checkpoint.every=0", "train.torch_threads=0", *extra)
    return read_metrics(run)


def losses(recs: list[dict]) -> list[float]:
    return [r["loss"] for r in recs if "loss" in r]


class Ctx:
    """Sizes, sequence lengths and data of one run (tiny or full)."""

    def __init__(self, tiny: bool, work: Path) -> None:
        self.tiny, self.work, self.t = tiny, work, "_tiny" if tiny else ""
        self.seq = 64 if tiny else 2048
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak = next((v for k, v in PEAK_TFLOPS.items() if k in self.device), 1.0 if tiny else float("nan"))
        self.common = [f"model.max_position_embeddings={self.seq}", "train.dtype=bf16", "train.eval_every=0",
                       "train.eval_batches=2", "train.log_every=2"]

    def data(self, seq: int) -> Path:
        path = self.work / f"data_{seq}"
        if not (path / "manifest.json").is_file():
            sh("data_tools.pack", "configs/demo/data.yaml", f"out_dir={path}", "overwrite=true", f"pack.seq_len={seq}")
        return path

    def size(self, name: str) -> list[str]:
        return SIZES[name + self.t]


STAGES: dict[str, Callable[[Ctx], dict]] = {}


def stage(fn: Callable[[Ctx], dict]) -> Callable[[Ctx], dict]:
    STAGES[fn.__name__.removeprefix("stage_")] = fn
    return fn


@stage
def stage_mfu(c: Ctx) -> dict:
    mb = 2 if c.tiny else 8
    recs = train(c.work / "mfu", c.data(c.seq), [*c.size("llm"), *c.common, f"train.micro_batch_size={mb}",
                                                   f"train.max_steps={6 if c.tiny else 30}", "train.zero_stage=1",
                                                   f"train.peak_tflops={c.peak if c.peak == c.peak else 0}"])
    steady = [r for r in recs if "tokens_per_s" in r][1:]  # the first window includes warm-up
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    return {"mfu": round(statistics.median(mfu), 4) if mfu else None, "micro_batch": mb, "zero_stage": 1,
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1)}


def _trainer_vs_plain(c: Ctx, size: str, seq: int, mb: int, profile: int) -> dict:
    out = c.work / f"trainer_{size}.json"
    sh(str(REPO / "bench/trainer_throughput.py"), "--data", str(c.data(seq)), "--rounds", "2" if c.tiny else "4",
       "--steps", "2" if c.tiny else "5", "--profile", str(profile), "--out", str(out), *c.size(size),
       f"model.max_position_embeddings={seq}", f"train.micro_batch_size={mb}", "train.torch_threads=0", module=False)
    return json.loads(out.read_text())


@stage
def stage_trainer_vs_plain_1b(c: Ctx) -> dict:
    res = _trainer_vs_plain(c, "llm", c.seq, 2 if c.tiny else 4, profile=3)
    return {"trainer_vs_plain_1b": res["trainer_vs_plain_tokens_per_s"], **res}


@stage
def stage_kd(c: Ctx) -> dict:
    data = c.data(c.seq)
    slm = c.work / "slm"
    if not (slm / "final" / "config.json").is_file():
        train(slm, data, [*c.size("slm"), *c.common, "train.micro_batch_size=2", "train.max_steps=2"])
    mb = 1 if c.tiny else 4
    llm = [f"data.path={data}", *c.size("llm"), *c.common, f"train.micro_batch_size={mb}", "train.zero_stage=1"]
    out = c.work / "kd.json"
    sh(str(REPO / "bench/kd_overhead.py"), "--skip-memory", "--rounds", "2" if c.tiny else "4", "--steps",
       "2" if c.tiny else "5", "--teacher", str(slm / "final"), "--work", str(c.work / "kd"), "--out", str(out),
       *[f"--llm={o}" for o in llm], f"--score=data={data}", f"--score=batch_size={64 if c.tiny else 4}", module=False)
    st = json.loads(out.read_text())["step_time"]
    return {k: st[k] for k in ("kd_step_ratio_online", "kd_step_ratio_cached", "kd_step_ratio_fused_linear",
                               "flop_limit")} | {"detail": st}


@stage
def stage_scoring(c: Ctx) -> dict:
    out = c.work / "score.json"
    sh(str(REPO / "bench/score_throughput.py"), "--realistic", "tiny" if c.tiny else "full", "--rows",
       "32" if c.tiny else "128", "--rounds", "2" if c.tiny else "4", "--out", str(out), module=False)
    res = json.loads(out.read_text())
    return {"scoring_vs_forward_realistic": res["scoring_vs_forward_tokens_per_s"], **res}


@stage
def stage_kd_memory(c: Ctx) -> dict:
    out = c.work / "kd_memory.json"
    vocabs = "2000,8000" if c.tiny else "32000,128000"
    sh(str(REPO / "bench/kd_overhead.py"), "--memory-only", "--memory-vocab", vocabs, "--out", str(out), module=False)
    mem = json.loads(out.read_text())["memory"]
    small, big = (f"vocab_{v}" for v in vocabs.split(","))
    return {"kd_loss_mem_ratio_32k": mem[small]["salt_fused_auto_vs_ce"],
            "kd_loss_mem_ratio_128k": mem[big]["salt_fused_auto_vs_ce"],
            "fused_linear_mem_ratio_32k": mem[small]["fused_linear_vs_ce_from_hidden"],
            "fused_linear_mem_ratio_128k": mem[big]["fused_linear_vs_ce_from_hidden"], **mem}


def _loss_path(name: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    """One CE-only loss from hidden states h [N, H] and a head w [V, H] (what a CE step's head + loss does)."""
    if name == "materialised":  # the trainer's CE path: the head's logits, then CE in fp32
        return torch.nn.functional.cross_entropy((h @ w.T).float(), y)
    if name == "fused_linear":  # ours at w_t = 0 (it still runs a width-8 teacher's KD term, so an upper bound)
        from slm_assist.kd.fused_linear import fused_linear_ce_kd
        from slm_assist.kd.losses import chunk_tokens

        return fused_linear_ce_kd(h, w, h[:, :8], w[:, :8], y, 0.0, chunk=chunk_tokens(-1, w.shape[0], h.is_cuda))[0]
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # the [gpu] extra's candidate

    return LigerFusedLinearCrossEntropyLoss()(w, h, y)


@stage
def stage_ce_path(c: Ctx) -> dict:
    """Item 4: does liger-kernel's fused linear CE help the CE-only path? Loss forward + backward from the 1B's
    last hidden states (micro-batch 4 x seq 2048, H 2048, bf16) at vocab 32k and 128k: median time and peak
    memory on top of the inputs, against CE on materialised logits and our fused-linear pass at w = 0."""
    import importlib.util

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, hid = (256, 64) if c.tiny else (4 * 2048, 2048)
    names = ["materialised", "fused_linear"]
    if dev.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    out: dict = {"paths": names, "tokens": n, "hidden": hid}
    for vocab in (2000, 8000) if c.tiny else (32000, 128000):
        g = torch.Generator(device=dev).manual_seed(0)
        h = (torch.randn(n, hid, device=dev, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
        w = (torch.randn(vocab, hid, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
        y = torch.randint(0, vocab, (n,), device=dev, generator=g)
        row: dict = {}
        for name in names:
            times, loss = [], None
            for _ in range(2 if c.tiny else 8):
                h.grad = w.grad = None
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                loss = _loss_path(name, h, w, y)
                loss.backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[name] = {"ms": round(statistics.median(times[1:] or times) * 1e3, 3), "loss": round(loss.item(), 5),
                         "peak_extra_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                         if dev.type == "cuda" else None}
        for name in names[1:]:
            row[f"{name}_time_vs_materialised"] = round(row[name]["ms"] / row["materialised"]["ms"], 4)
            if dev.type == "cuda":
                row[f"{name}_mem_vs_materialised"] = round(row[name]["peak_extra_mb"]
                                                           / row["materialised"]["peak_extra_mb"], 4)
        out[f"vocab_{vocab}"] = row
    return out


@stage
def stage_trainer_vs_plain_88m(c: Ctx) -> dict:
    res = _trainer_vs_plain(c, "mid", 64 if c.tiny else 256, 4 if c.tiny else 32, profile=0)
    return {"trainer_vs_plain_88m": res["trainer_vs_plain_tokens_per_s"], **res}


@stage
def stage_optimizer(c: Ctx) -> dict:
    """Trainer tokens/s on the 1B with DeepSpeed's FusedAdam vs torch's fused AdamW (ZeRO-1, the mfu settings)."""
    mb, tps = 2 if c.tiny else 8, {}
    for impl in ("torch", "torch_fused") if c.tiny else ("deepspeed_fused", "torch_fused"):  # FusedAdam needs CUDA
        recs = train(c.work / f"optim_{impl}", c.data(c.seq), [
            *c.size("llm"), *c.common, f"train.micro_batch_size={mb}", f"train.max_steps={6 if c.tiny else 20}",
            "train.zero_stage=1", f"optim.impl={impl}"])
        tps[impl] = statistics.median([r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:])
    base = tps.get("deepspeed_fused", tps.get("torch"))
    return {"tokens_per_s": tps, "torch_fused_vs_other": round(tps["torch_fused"] / base, 4)}


@stage
def stage_attention(c: Ctx) -> dict:
    small = [*c.size("slm"), "train.micro_batch_size=2", "train.max_steps=6", *c.common]
    la = losses(train(c.work / "attn_auto", c.data(c.seq), [*small, "model.attn_implementation=auto"]))
    ls = losses(train(c.work / "attn_sdpa", c.data(c.seq), [*small, "model.attn_implementation=sdpa"]))
    import importlib.util

    return {"flash_attn_installed": importlib.util.find_spec("flash_attn") is not None, "auto_losses": la,
            "sdpa_losses": ls, "max_abs_diff": max(abs(a - b) for a, b in zip(la, ls))}


@stage
def stage_zero(c: Ctx) -> dict:
    small = [*c.size("slm"), "train.micro_batch_size=2", "train.max_steps=6", *c.common]
    l1, l2 = (losses(train(c.work / f"zero{s}", c.data(c.seq), [*small, f"train.zero_stage={s}"])) for s in (1, 2))
    return {"zero1_losses": l1, "zero2_losses": l2, "max_abs_diff": max(abs(a - b) for a, b in zip(l1, l2))}


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for pkg in ("transformers", "deepspeed", "datasets", "flash-attn", "liger-kernel", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _write(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, few steps")
    ap.add_argument("--out", default=str(REPO / "bench/results/gpu.json"))
    ap.add_argument("--work", default="/tmp/slm_assist_gpu")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order: " + ",".join(STAGES))
    ap.add_argument("--resume", action="store_true", help="skip the stages the --out JSON already has without error")
    args = ap.parse_args()
    names = [s for s in args.stages.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        sys.exit(f"error: --stages: unknown {unknown}; known: {', '.join(STAGES)}")
    out, log = Path(args.out), Path(args.out).with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    c = Ctx(args.tiny, Path(args.work))
    c.work.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    result.update({k: result.get(k) for k in KEYS})
    result.update(device=c.device, peak_tflops=c.peak, seq_len=c.seq, tiny=args.tiny, versions=versions(),
                  date=datetime.date.today().isoformat())
    result.setdefault("stages", {})
    _write(out, result)
    for name in names:
        if args.resume and "error" not in result["stages"].get(name, {"error": 1}):
            continue
        t0 = time.time()
        try:
            res, ok = STAGES[name](c), True
        except Exception as e:  # fail-soft: record it and go on to the next stage
            res, ok = {"error": f"{type(e).__name__}: {e}"[-4000:], "traceback": traceback.format_exc()[-2000:]}, False
        seconds = round(time.time() - t0, 1)
        with log.open("a") as f:
            f.write(json.dumps({"stage": name, "ok": ok, "seconds": seconds, "result": res}) + "\n")
        result["stages"][name] = {**res, "seconds": seconds}
        result.update({k: res[k] for k in KEYS if k in res})
        _write(out, result)
        print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.0f}s: "
              + json.dumps({k: res.get(k) for k in KEYS if k in res} if ok else res["error"][:300]), flush=True)
    print(json.dumps({k: result[k] for k in KEYS}, indent=1))
    failed = [n for n in names if "error" in result["stages"].get(n, {})]
    if failed:
        sys.exit(f"error: stages failed: {failed} (details in {out})")


if __name__ == "__main__":
    main()
