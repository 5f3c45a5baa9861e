#!/usr/bin/env bash
# The GPU check in one command (make gpu-check): a CUDA build, the exactness tests with every
# layer offloaded, and the speed benchmark -> docs/speed/cuda/. Sized for one datacenter GPU in
# under 8 minutes: the build is the long part (ccache makes a rerun quick).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "gpu-check: nvcc not found (a CUDA toolkit is needed)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# the CUDA build replaces the CPU one in .venv (make install rebuilds it for the CPU afterwards)
CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" make install

# exactness on the GPU: the replay oracle and the two attention paths, every layer offloaded
VP_GGUF_TEST_N_GPU_LAYERS=-1 .venv/bin/python -m pytest -q -x \
    tests/test_replay_oracle.py tests/test_attn_paths.py tests/test_visionpulse.py

# speed: dense with flash attention on and off, VisionPulse 5 through each path
.venv/bin/python scripts/speed_bench.py --models synthetic,gemma --sizes 4096,16384,32768 --reps 3 \
    --configs fa-on,fa-off --modes vp5-mask,vp5-gather,floor --prefill-sizes 576 --gpu \
    --out docs/speed/cuda
