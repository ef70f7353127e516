#!/usr/bin/env bash
# GPU checks (bench/gpu.py): SD-VAE-sized encoder bare vs the encode job (Pillow threads and
# nvjpeg), a DiT-B/2 bf16 training step (samples/s, MFU), and finetune's step on the real SDXL
# UNet architecture at 1024² (LoRA with and without gradient checkpointing; a full fine-tune
# sharded with FSDP2 over every visible GPU vs unsharded). Run on a machine with CUDA GPUs from
# the repository root; sets up .venv first when it is missing. About 8 minutes.
# Usage: bash bench/gpu.sh [--peak-tflops 989] [--images 1024] [--parts vae,dit,sdxl]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[test]'
fi
export RAY_AUTH_MODE=disabled
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
exec .venv/bin/python bench/gpu.py "$@"
