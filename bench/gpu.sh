#!/usr/bin/env bash
# GPU checks (bench/gpu.py): SD-VAE-sized encoder bare vs the encode job (Pillow threads and
# nvjpeg), and a DiT-B/2 bf16 training step (samples/s, MFU). Run on a machine with one CUDA
# GPU from the repository root; sets up .venv first when it is missing. About 5 minutes.
# Usage: bash bench/gpu.sh [--peak-tflops 989] [--images 1024]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[test]'
fi
export RAY_AUTH_MODE=disabled
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
exec .venv/bin/python bench/gpu.py "$@"
