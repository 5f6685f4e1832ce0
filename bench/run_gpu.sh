#!/usr/bin/env bash
# The CUDA checks and timings in one go: every gpu-marked test, then every gpu-marked benchmark.
# Run from the repository root of an installed checkout on a CUDA machine; logs and the benchmark
# JSON land in $OUT (default ./gpu-results).
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
  python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("sglang", "vllm", "flash-attn"):  # the optional GPU engines and attention this machine has
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
PY
} | tee "$out/device.txt"
python3 -m pytest -q -m gpu -rs tests/ 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 -m pytest -q -m gpu bench/ --benchmark-only --benchmark-json="$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
for attn in sdpa flex_attention; do  # end to end: a few IB-TPO steps of the bundled model, each tree attention default
  timeout 120 python3 -m ibtpo_fast.train train.steps=3 data.val_size=16 run.progress=off run.resume=never \
    model.attn_implementation=$attn run.out_dir="/tmp/run-$attn" 2>&1 | tail -5 | tee "$out/train-$attn.log"
done
# mixed precision (fp32 master weights, bf16 compute) with micro-batches and activation checkpointing, on one GPU
timeout 300 python3 -m torch.distributed.run --nproc-per-node 1 --standalone -m ibtpo_fast.train train.steps=3 \
  data.val_size=16 run.progress=off run.resume=never model.dtype=bfloat16 train.mini_batches=2 \
  train.max_tokens_per_micro_batch=512 train.activation_checkpointing=true run.out_dir=/tmp/run-bf16 2>&1 | tail -5 \
  | tee "$out/train-bf16.log"
if python3 -c "import sglang" 2>/dev/null; then  # end to end with SGLang driving the rollouts
  timeout 300 python3 -m ibtpo_fast.train train.steps=3 data.val_size=16 run.progress=off run.resume=never \
    rollout.engine=sglang rollout.sglang.mem_fraction_static=0.2 "rollout.sglang.engine_args={skip_tokenizer_init: true}" \
    run.out_dir=/tmp/run-sglang 2>&1 | tail -5 | tee "$out/train-sglang.log"
fi
python3 - "$out/gpu_bench.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(b["name"], json.dumps(b["extra_info"], indent=1))
PY
exit $(( tests || bench ))
