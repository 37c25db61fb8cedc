#!/usr/bin/env bash
# GPU check of data_tools.score throughput vs a bare forward pass (random-init scorers, demo data). Writes $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import deepspeed, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null \
    && PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 bench/score_throughput.py --throughput-only --rounds 4 --out "$OUT/score_gpu.json" 2>&1 | grep -v '%|' | tail -40
