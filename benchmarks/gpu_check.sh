#!/usr/bin/env bash
# The one script a device run executes: `bash benchmarks/gpu_check.sh OUT` (at most ~4 minutes on one
# GPU), or `CPU_DRY_RUN=1 bash benchmarks/gpu_check.sh OUT` (every step at a tiny size on the CPU;
# .ci/run calls it). Pure PyTorch from the source tree: the device machine has no Ray and no Flower.
set -euo pipefail
out="${1:?usage: gpu_check.sh OUT}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "${CPU_DRY_RUN:-0}" = "1" ]; then
  timeout 180 python3 -m benchmarks.gpu_check "$out" --dry-run
else
  timeout 240 python3 -m benchmarks.gpu_check "$out" --device cuda
fi
