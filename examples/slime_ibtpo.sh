#!/bin/bash
# IB-TPO in slime (THUDM/slime at SLIME_COMMIT of ibtpo_fast/integrations/slime.py): Qwen2.5-0.5B-Instruct
# on the bundled arithmetic task, one node. slime needs GPUs, Megatron-LM and Ray: run it in slime's
# Docker image, from this repository's root, with ibtpo_fast installed, the model in MODEL_DIR and its
# Megatron torch_dist conversion beside it (slime's README shows the conversion):
#
#   python examples/bundled_task_data.py data/arithmetic
#   SLIME_DIR=/root/slime MODEL_DIR=/root NUM_GPUS=1 bash examples/slime_ibtpo.sh
set -ex

SLIME_DIR=${SLIME_DIR:-/root/slime}
MODEL_DIR=${MODEL_DIR:-/root}
NUM_GPUS=${NUM_GPUS:-1}
source "${SLIME_DIR}/scripts/models/qwen2.5-0.5B.sh"  # MODEL_ARGS

# the two hooks, the tree (slime_ibtpo.yaml) and the reward the tree branches on
IBTPO_ARGS=(
   --rollout-function-path ibtpo_fast.integrations.slime.generate_rollout
   --custom-advantage-function-path ibtpo_fast.integrations.slime.compute_advantages
   --custom-config-path examples/slime_ibtpo.yaml
   --n-samples-per-prompt 6
   --custom-rm-path examples.rewards.rm
)

CKPT_ARGS=(
   --hf-checkpoint "${MODEL_DIR}/Qwen2.5-0.5B-Instruct/"
   --ref-load "${MODEL_DIR}/Qwen2.5-0.5B-Instruct_torch_dist/"
)

ROLLOUT_ARGS=(
   --prompt-data data/arithmetic/train.parquet
   --input-key prompt
   --label-key label
   --apply-chat-template
   --rollout-shuffle
   --num-rollout 100
   --rollout-batch-size 16
   --rollout-max-response-len 256
   --rollout-temperature 1
   --global-batch-size 96
)

GRPO_ARGS=(
   --advantage-estimator grpo
   --use-kl-loss
   --kl-loss-coef 0.001
   --kl-loss-type low_var_kl
   --eps-clip 0.2
)

SGLANG_ARGS=(
   --rollout-num-gpus-per-engine 1
   --sglang-mem-fraction-static 0.5
)

# Megatron's own options
MEGATRON_ARGS=(
   --tensor-model-parallel-size 1
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --use-dynamic-batch-size
   --max-tokens-per-gpu 4096
   --optimizer adam
   --lr 1e-6
   --lr-decay-style constant
   --weight-decay 0.1
   --attention-dropout 0.0
   --hidden-dropout 0.0
)

ray start --head --node-ip-address 127.0.0.1 --num-gpus "${NUM_GPUS}" --disable-usage-stats
ray job submit --address="http://127.0.0.1:8265" \
   --runtime-env-json="{\"env_vars\": {\"PYTHONPATH\": \"/root/Megatron-LM:${PWD}\", \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\"}}" \
   -- python3 "${SLIME_DIR}/train.py" \
   --actor-num-nodes 1 \
   --actor-num-gpus-per-node "${NUM_GPUS}" \
   --colocate \
   "${MODEL_ARGS[@]}" \
   "${IBTPO_ARGS[@]}" \
   "${CKPT_ARGS[@]}" \
   "${ROLLOUT_ARGS[@]}" \
   "${GRPO_ARGS[@]}" \
   "${SGLANG_ARGS[@]}" \
   "${MEGATRON_ARGS[@]}"
