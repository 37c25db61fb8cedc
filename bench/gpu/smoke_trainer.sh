#!/usr/bin/env bash
# GPU smoke check of the issue-2 trainer on one CUDA GPU: bf16 + DeepSpeed FusedAdam at ZeRO-1 and ZeRO-2,
# NCCL single-process init, attention choice, HF export, and the trainer-vs-plain-loop throughput ratio.
# Expects wheels in .whl/ (datasets, deepspeed sdist, ...) when the machine lacks them. Writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, datasets, transformers, pyarrow, importlib.util as u; print('torch', torch.__version__, 'ds', deepspeed.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'flash_attn', u.find_spec('flash_attn') is not None)" | tee -a "$OUT/gpu.txt"
python3 -m data_tools.pack configs/demo/data.yaml out_dir=/tmp/data overwrite=true 2>&1 | grep -v '%|' | tail -2
# ~110M-param Llama, seq 256, micro-batch 32.
BIG="model.hidden_size=768 model.num_layers=12 model.num_heads=12 model.ffn_size=2048 train.micro_batch_size=32 optim.lr=6e-4 train.torch_threads=0"
for Z in 1 2; do
  python3 -m slm_assist.train configs/demo/llm.yaml data.path=/tmp/data run_dir=/tmp/r_z$Z $BIG train.zero_stage=$Z \
    train.max_steps=80 train.eval_every=40 checkpoint.every=40 2>&1 | grep -v '%|' | tail -4 | tee -a "$OUT/train_z$Z.log"
  cp /tmp/r_z$Z/metrics.jsonl "$OUT/metrics_z$Z.jsonl" 2>/dev/null
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/tmp/r_z2/final", dtype=torch.bfloat16).cuda()
print("export loads on cuda:", sum(p.numel() for p in m.parameters()), m.config._attn_implementation)
PY
python3 bench/trainer_throughput.py --rounds 4 --steps 10 --out "$OUT/trainer_gpu.json" $BIG 2>&1 | grep -v '%|' | tail -16
