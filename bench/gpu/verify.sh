#!/usr/bin/env bash
# Issue 14 on one CUDA GPU (H100/H200): MFU of a ~1B model, trainer vs a plain loop (with a profile), KD step and
# memory ratios, scoring vs forward on a realistic scorer, attention and ZeRO checks. Fail-soft: every stage is
# appended to $OUT/gpu.jsonl and merged into $OUT/gpu.json as it ends. Installs missing wheels from .whl/.
# Extra arguments go to verify.py (e.g. --stages mfu,kd --resume).
set -uo pipefail
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
source bench/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 bench/gpu/verify.py --out "$OUT/gpu.json" "$@" 2>&1 | grep -v '%|'
