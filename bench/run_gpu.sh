#!/usr/bin/env bash
# The CUDA checks and timings in one go: every gpu-marked test, then every gpu-marked benchmark, then a few
# end-to-end training steps (with SGLang driving the rollouts too). Run from the repository root of an
# installed checkout on a CUDA machine; logs and the benchmark JSON land in $OUT (default ./gpu-results).
# What is missing is installed first (the sglang extra, with the CUDA torch it pins), or named in one line.
# Exits non-zero when any check fails, and says which.
set -u -o pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()

check() {  # check NAME COMMAND...: run it, and remember NAME if it fails
  local name=$1
  shift
  "$@" || failed+=("$name")
}

need() {  # need NAME IMPORT INSTALL...: import IMPORT, else install, else one line saying what is missing
  local name=$1 module=$2
  shift 2
  python3 -c "import $module" 2>/dev/null && return 0
  echo "run_gpu.sh: installing $name: $*"
  if ! "$@" >"$out/install-$name.log" 2>&1 || ! python3 -c "import $module" 2>/dev/null; then
    echo "run_gpu.sh: $name is missing and did not install (tried: $*; see $out/install-$name.log)"
    return 1
  fi
}

check dev-extra need dev-extra pytest_benchmark python3 -m pip install -q -e ".[dev]"
check sglang-extra need sglang-extra sglang python3 -m pip install -q -e ".[dev,sglang]"  # pins its CUDA torch
check cuda-torch python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
  f'run_gpu.sh: torch {torch.__version__} sees no CUDA device')"

logged() {  # logged NAME COMMAND...: its output shown and kept in $out/NAME.log, its exit status returned
  local name=$1
  shift
  "$@" 2>&1 | tee "$out/$name.log"
}
device() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv &&
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)" &&
  python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("sglang", "vllm", "flash-attn"):  # the optional GPU engines and attention this machine has
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
PY
}
check device logged device device
check gpu-tests logged gpu_tests python3 -m pytest -q -m gpu -rs tests/
check sglang-fidelity logged sglang_fidelity python3 -m pytest -q -rs tests/test_sglang_rollouts.py -k regenerates
check gpu-bench logged gpu_bench python3 -m pytest -q -m gpu bench/ --benchmark-only --benchmark-json="$out/gpu_bench.json"
train() {  # train NAME [--torchrun] ARGS...: a few IB-TPO steps of the bundled model, the log's tail kept
  local name=$1 launch=()
  shift
  if [ "${1:-}" = --torchrun ]; then
    launch=(-m torch.distributed.run --nproc-per-node 1 --standalone)
    shift
  fi
  timeout 300 python3 "${launch[@]}" -m ibtpo_fast.train train.steps=3 data.val_size=16 run.progress=off \
    run.resume=never run.out_dir="/tmp/run-$name" "$@" 2>&1 | tail -5 | tee "$out/train-$name.log"
}
for attn in sdpa flex_attention; do  # each tree attention default
  check "train-$attn" train "$attn" model.attn_implementation=$attn
done
# mixed precision (fp32 master weights, bf16 compute) with micro-batches and activation checkpointing, on one GPU
check train-bf16 train bf16 --torchrun model.dtype=bfloat16 train.mini_batches=2 train.max_tokens_per_micro_batch=512 \
  train.activation_checkpointing=true
check train-sglang train sglang rollout.engine=sglang rollout.sglang.mem_fraction_static=0.2 \
  "rollout.sglang.engine_args={skip_tokenizer_init: true}"
if [ -f "$out/gpu_bench.json" ]; then
  python3 - "$out/gpu_bench.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(b["name"], json.dumps(b["extra_info"], indent=1))
PY
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_gpu.sh: failed: ${failed[*]}"
  exit 1
fi
echo "run_gpu.sh: every check passed"
