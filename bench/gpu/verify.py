"""Issue 6: the GPU path in one run, written to bench/results/gpu.json (or --out).

1. attention: `attn_implementation=auto` picks flash-attn when installed, else sdpa; both give the same loss
   (bf16 tolerance) on the same batches.
2. bf16 under DeepSpeed ZeRO-1 and ZeRO-2 with DeepSpeed's FusedAdam: identical losses between the stages.
3. MFU of the trainer on a ~1B Llama at seq 2048: models.flops_per_token x tokens/s / peak bf16 FLOP/s.
4. KD step time / CE step time, online SLM teacher (~0.25B) and cached top-k, next to 1 + N_slm / (3 N_llm).
5. data_tools.score throughput / a bare forward pass.

    bash bench/gpu/verify.sh                 # on the GPU machine (installs missing wheels from .whl/)
    python bench/gpu/verify.py --tiny        # CPU smoke test of this script with tiny models (numbers meaningless)

Status: written and smoke-tested on CPU with --tiny; not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from slm_assist.training.metrics import read_metrics
from slm_assist.training.models import flops_per_token

REPO = Path(__file__).resolve().parents[2]

# dense bf16 peak of one device, TFLOP/s (SXM parts; the PCIe H100 is 756)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

SIZES = {  # ~1.0B and ~0.25B Llamas (TinyLlama-like shapes), and tiny ones for the CPU smoke test
    "llm": ["model.hidden_size=2048", "model.num_layers=22", "model.num_heads=16", "model.num_kv_heads=4",
            "model.ffn_size=5632"],
    "slm": ["model.hidden_size=1024", "model.num_layers=16", "model.num_heads=8", "model.num_kv_heads=4",
            "model.ffn_size=2816"],
    "llm_tiny": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.ffn_size=128"],
    "slm_tiny": ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.ffn_size=64"],
}


def sh(*cmd: str) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    res = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


def train(run: Path, data: Path, extra: list[str]) -> list[dict]:
    sh("slm_assist.train", "configs/demo/llm.yaml", f"run_dir={run}", f"data.path={data}", "checkpoint.resume=false",
       "checkpoint.every=0", "train.torch_threads=0", *extra)
    return read_metrics(run)


def peak_tflops(tiny: bool) -> tuple[str, float]:
    if not torch.cuda.is_available():
        return "cpu", 1.0 if tiny else float("nan")
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, few steps")
    ap.add_argument("--out", default=str(REPO / "bench/results/gpu.json"))
    ap.add_argument("--work", default="/tmp/slm_assist_gpu")
    args = ap.parse_args()
    work, t = Path(args.work), "_tiny" if args.tiny else ""
    seq = 64 if args.tiny else 2048
    steps = 6 if args.tiny else 30
    data = work / f"data_{seq}"
    if not (data / "manifest.json").is_file():
        sh("data_tools.pack", "configs/demo/data.yaml", f"out_dir={data}", "overwrite=true", f"pack.seq_len={seq}")
    device, peak = peak_tflops(args.tiny)
    out: dict = {"device": device, "seq_len": seq, "peak_tflops": peak}
    common = [f"model.max_position_embeddings={seq}", "train.dtype=bf16", "train.eval_every=0", "train.eval_batches=2",
              "train.log_every=2"]

    # 1. attention: auto vs sdpa, same seed and batches
    small = [*SIZES["llm_tiny" if args.tiny else "slm"], "train.micro_batch_size=2", "train.max_steps=6", *common]
    auto = train(work / "attn_auto", data, [*small, "model.attn_implementation=auto"])
    sdpa = train(work / "attn_sdpa", data, [*small, "model.attn_implementation=sdpa"])
    la, ls = [r["loss"] for r in auto if "loss" in r], [r["loss"] for r in sdpa if "loss" in r]
    import importlib.util

    out["attention"] = {"flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
                        "auto_losses": la, "sdpa_losses": ls,
                        "max_abs_diff": max(abs(a - b) for a, b in zip(la, ls))}

    # 2. ZeRO-1 vs ZeRO-2, bf16, fused Adam on CUDA (torch AdamW on CPU)
    z = {s: train(work / f"zero{s}", data, [*small, f"train.zero_stage={s}"]) for s in (1, 2)}
    l1, l2 = ([r["loss"] for r in z[s] if "loss" in r] for s in (1, 2))
    out["zero"] = {"zero1_losses": l1, "zero2_losses": l2, "max_abs_diff": max(abs(a - b) for a, b in zip(l1, l2))}

    # 3. MFU on the ~1B model
    llm = SIZES["llm" + t]
    mb = 2 if args.tiny else 8
    recs = train(work / "mfu", data, [*llm, *common, f"train.micro_batch_size={mb}", f"train.max_steps={steps}",
                                      "train.zero_stage=1", f"train.peak_tflops={peak if peak == peak else 0}"])
    steady = [r for r in recs if "tokens_per_s" in r][1:]  # the first window includes compilation / warm-up
    final = AutoModelForCausalLM.from_pretrained(str(work / "mfu" / "final"))
    n_params = sum(p.numel() for p in final.parameters())
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    fpt = flops_per_token(final, seq)
    out.update(model_params=n_params, micro_batch=mb, tokens_per_s=tps, flops_per_token=fpt,
               mfu=fpt * tps / (peak * 1e12) if peak == peak else None)
    del final

    # 4. KD overhead, online and cached, on the ~1B / ~0.25B pair (bench/kd_overhead.py in its own process)
    slm_run = work / "slm"
    train(slm_run, data, [*SIZES["slm" + t], *common, "train.micro_batch_size=2", "train.max_steps=2"])
    llm_kd = [f"data.path={data}", *llm, *common, f"train.micro_batch_size={mb // 2}", "train.zero_stage=1"]
    subprocess.run([sys.executable, str(REPO / "bench/kd_overhead.py"), "--skip-memory", "--rounds",
                    "2" if args.tiny else "4", "--steps", "2" if args.tiny else "5", "--teacher", str(slm_run / "final"),
                    "--work", str(work / "kd"), "--out", str(work / "kd.json"), *[f"--llm={o}" for o in llm_kd],
                    f"--score=data={data}", "--score=batch_size=4"], cwd=REPO, check=True)
    st = json.loads((work / "kd.json").read_text())["step_time"]
    out.update(kd_step_ratio_online=st["kd_step_ratio_online"], kd_step_ratio_cached=st["kd_step_ratio_cached"],
               flop_limit=st["flop_limit"], kd_detail=st)

    # 5. scoring vs a bare forward pass
    score_out = work / "score.json"
    subprocess.run([sys.executable, str(REPO / "bench/score_throughput.py"), "--throughput-only", "--rounds",
                    "2" if args.tiny else "4", "--out", str(score_out)], cwd=REPO, check=True)
    score = json.loads(score_out.read_text())
    out["scoring_vs_forward_tokens_per_s"] = score["scoring_vs_forward_tokens_per_s"]
    out["scoring_vs_forward_larger_scorer"] = score["larger_scorer"]["scoring_vs_forward_tokens_per_s"]
    out["scoring_detail"] = score
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
