#!/usr/bin/env bash
# The performance issue's GPU checks in one run, for a session that draws a GPU (about 8 minutes on
# an H200; each step has its own time limit, and a failed step does not stop the next):
#   1. versions and a smoke test (jaxft imports; is XLA's float32 matmul TF32);
#   2. the 1B decoder-only bf16 train step against torch (SDPA) on the same GPU, with MFU against the
#      measured bf16 matmul peak (jaxft's state built on the host CPU; layers scanned), the state
#      init's compile time at 2 and 4 layers, then the step with unrolled layers (jaxft alone); each
#      step's JSON also gives its compiled program's roofline floor and the measured step over it
#      (`jaxft_step_over_floor`; `jaxft.train.hlo_cost.kernel_floor`, compiled-only estimates in RESULTS.md);
#   3. attention forward + backward at the 1B shape: XLA against cuDNN (dense mask, + is_causal);
#   4. the cuDNN tests (tests/test_attention_gpu.py: cuDNN equals XLA attention, and runs);
#   5. decoding against HF `generate` on the GPU (batch 8 and 32; top-p sampling too at batch 8), then
#      bf16 compute at batch 8, then stacked against per-layer;
#   6. the scanned 1B step with model.remat=dots_attention (jaxft alone).
# Prints the rows for benchmarks/RESULTS.md; the whole log goes to $OUT/gpu_check.log when OUT is set.
# Needs jax with CUDA, torch and transformers (the device image).  Packages jaxft needs and the
# image lacks (babel, num2words; docopt, which num2words imports) are taken from .whl/site when
# present: copy them there from a local .venv (`echo /.whl/ >> .git/info/exclude; mkdir -p .whl/site;
# cp -r .venv/lib/python3.*/site-packages/{babel,num2words,docopt.py} .whl/site/`) and name .whl in
# the device tool's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
# torch and XLA share the card: XLA grows its pool as it needs (the train step runs torch first
# and hands torch's cache back before XLA's turn)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 JAX_PLATFORMS=${GPU_CHECK_PLATFORM:-cuda}
exec > >(tee -a "$LOG") 2>&1

step() {  # step SECONDS NAME COMMAND...: one check under its own time limit
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  return $rc
}

SMOKE='import jax, flax, optax, torch, transformers
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, jax.devices())
import jaxft.train.step, jaxft.interop.hf, jaxft.eval.decode  # the imports that the checks need
import numpy as np
a = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)
ref = a.astype(np.float64) @ a
print("float32 matmul relative error (TF32 ~1e-4, full ~1e-7):",
      np.linalg.norm(np.asarray(jax.numpy.dot(a, a)) - ref) / np.linalg.norm(ref))'

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
if ! step 60 smoke python3 -c "$SMOKE" && [ -d .whl_alt ]; then  # the image's flax / optax: fall back to the pinned ones
  python3 -m pip install -q --no-index --no-deps --target /tmp/alt .whl_alt/*.whl && \
    export PYTHONPATH="/tmp/alt:$PYTHONPATH" && step 60 smoke-pinned python3 -c "$SMOKE"
fi
# The 1B step first: the issue's GPU goals (MFU, ratio to torch) and never yet measured. 2026-12-04:
# jaxft's state init did not compile within 200 s; the state is now built on the host CPU
# (JAX_PLATFORMS=cuda,cpu) and the layers run as one scan (model.scan_layers, as pod runs do), so
# one layer's program is compiled whatever XLA:GPU makes of 22 unrolled ones.
step 240 train-1b-scan env JAX_PLATFORMS=cuda,cpu python3 benchmarks/train_step.py --preset 1b --dtype bfloat16 \
  --batch 8 --steps 10 --threads 16 --init-on-host --scan-layers
# the state init's compile time on the GPU by depth (layers are drawn by one scanned layer init)
step 90 init-compile python3 benchmarks/init_compile.py --layers 2 4
# the same step unrolled (jaxft alone: torch was measured above)
step 200 train-1b env JAX_PLATFORMS=cuda,cpu python3 benchmarks/train_step.py --preset 1b --dtype bfloat16 --batch 8 \
  --steps 10 --threads 16 --init-on-host --no-peer
step 60 attention python3 benchmarks/attention_gpu.py
step 90 cudnn-tests env XLA_FLAGS="--xla_backend_optimization_level=3 --xla_llvm_disable_expensive_passes=false" python3 -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py
step 180 decode-b8 python3 benchmarks/decode.py --batch 8 --d-model 1024 --layers 8 --strategies greedy beam4 sample
step 150 decode-b32 python3 benchmarks/decode.py --batch 32 --d-model 1024 --layers 8
# bf16 compute (jaxft: float32 parameters cast once per call, `models.precast`; HF: bf16 weights)
step 150 decode-bf16 python3 benchmarks/decode.py --batch 8 --d-model 2048 --layers 8 --dtype bfloat16
# stacked layers (evaluation during a model.scan_layers run) against the per-layer model: on the CPU
# the scan copies each layer's weights out of the stack per token (13-27% slower); GPUs may fuse it
step 100 decode-depth python3 benchmarks/decode_depth.py --d-model 1024 --layers 8 32 --strategy greedy
# the scanned 1B step again with model.remat=dots_attention (17% fewer temporaries, compiled here): what the
# recomputed norms / RoPE / activations cost in step time (jaxft alone)
step 150 train-1b-dots-attention env JAX_PLATFORMS=cuda,cpu python3 benchmarks/train_step.py --preset 1b \
  --dtype bfloat16 --batch 8 --steps 10 --threads 16 --init-on-host --scan-layers --remat dots_attention --no-peer
echo "=== rows"
grep -h '^| 20' "$LOG" || true
