#!/usr/bin/env bash
# The performance issue's GPU checks in one run (for a session that draws a GPU; about 7 minutes on
# an H100/H200): the 1B decoder-only bf16 train step against torch (SDPA) on the same GPU, with MFU
# against the measured bf16 matmul peak, then decoding against HF `generate` on the GPU. Prints the
# rows for benchmarks/RESULTS.md. Needs jax with CUDA, torch and transformers (the device image).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/train_step.py --preset 1b --dtype bfloat16 --batch 8 --steps 10
python benchmarks/decode.py --batch 8 --d-model 1024 --layers 8
python benchmarks/decode.py --batch 32 --d-model 1024 --layers 8
# stacked layers (evaluation during a model.scan_layers run) against the per-layer model: on the CPU
# the scan copies each layer's weights out of the stack per token (13-27% slower); GPUs may fuse it
python benchmarks/decode_depth.py --d-model 1024 --layers 8 32 --strategy greedy
