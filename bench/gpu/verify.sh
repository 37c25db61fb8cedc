#!/usr/bin/env bash
# Issue 6 on one CUDA GPU (H100/H200): attention choice, ZeRO-1/2 bf16 + FusedAdam, MFU of a ~1B model, KD
# overhead on a ~1B/0.25B pair, scoring throughput. Installs missing wheels from .whl/ (see README.md here).
# Writes $OUT/gpu.json (OUT defaults to bench/results).
set -uo pipefail
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# DeepSpeed 0.19.8's op builder cannot parse arch suffixes such as "9.0a" in TORCH_CUDA_ARCH_LIST.
export TORCH_CUDA_ARCH_LIST="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
if ! python3 -c "import deepspeed, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 bench/gpu/verify.py --out "$OUT/gpu.json" 2>&1 | grep -v '%|'
