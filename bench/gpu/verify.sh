#!/usr/bin/env bash
# Issue 6 on one CUDA GPU (H100/H200): attention choice, ZeRO-1/2 bf16 + FusedAdam, MFU of a ~1B model, KD
# overhead on a ~1B/0.25B pair, scoring throughput. Installs missing wheels from .whl/ (see README.md here).
# Writes $OUT/gpu.json (OUT defaults to bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 bench/gpu/verify.py --out "$OUT/gpu.json" 2>&1 | grep -v '%|'
