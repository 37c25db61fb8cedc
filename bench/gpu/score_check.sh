#!/usr/bin/env bash
# GPU check of data_tools.score throughput vs a bare forward pass (random-init scorers, demo data). Writes $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/gpu/env.sh
python3 bench/score_throughput.py --throughput-only --rounds 4 --out "$OUT/score_gpu.json" 2>&1 | grep -v '%|' | tail -40
