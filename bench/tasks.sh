#!/usr/bin/env bash
# Quality of the x2 and restore task models on whole held-out photos, at the demo's training
# budget: encodes the demo's image shards with the upscale2 and restore views (the demo's own
# autoencoder), trains each task's pixel refiner and task model as the demo trains its x4 ones
# (refiner: 700 steps on the demo's refiner crops; task model: 500 steps, 2 workers, the refiner
# bundled, gain calibrated on the demo's calibration crops), then runs bench/quality.py on each.
# Needs a finished `make demo` (demo-out/). About 20 minutes on 2 cores.
# Usage: bash bench/tasks.sh [DEMO_DIR] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-demo-out}
work=${2:-bench-tasks}
lp=".venv/bin/latent-pipeline"
export RAY_AUTH_MODE=disabled
$lp encode --input "$demo/image-shards/shard-*.tar" --output "$work/latents" --vae "$demo/vae" \
  --resolution 64 --tasks upscale2,restore
for task in upscale2 restore; do
  $lp train-refiner --task "$task" --images "$demo/refiner-shards/shard-*.tar" \
    --heldout "$demo/heldout-shards/shard-*.tar" --output "$work/refiner-$task" --steps 700 \
    --checkpoint-every 350 --eval-images 6 --workers 1 --cpus-per-worker 2 --log-every 100
  $lp train --latents "$work/latents" --output "$work/$task" --task "$task" --steps 500 --batch-size 32 \
    --refiner "$work/refiner-$task" --lr 1e-3 --warmup-steps 50 --checkpoint-every 250 --workers 2 --log-every 100 \
    --calibration-images "$demo/calibration"
  .venv/bin/python bench/quality.py --checkpoint "$work/$task" --task "$task" --json "bench/results/quality-$task.json"
done
