# Sourced by the bench/gpu scripts: the environment every GPU check needs on the device image.
export PYTHONUNBUFFERED=1
# DeepSpeed 0.19.8's op builder cannot parse arch suffixes such as "9.0a" in TORCH_CUDA_ARCH_LIST (int("0a")).
export TORCH_CUDA_ARCH_LIST="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
# The image lacks deepspeed and datasets: install them from the wheels carried in .whl/ (see README.md here).
if ! python3 -c "import deepspeed, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
