#!/usr/bin/env bash
# Pretrain on one machine with N processes (one per GPU; on a CPU-only machine, N gloo processes).
#
#   launch/single_node.sh N CONFIG [key=value ...]
#   launch/single_node.sh 8 configs/train/hope-760m.yaml train.max_steps=2000
#   launch/single_node.sh 2 configs/train/hope-tiny-cpu.yaml parallel.tensor_parallel=2
#
# The config and the overrides reach `hope-scale pretrain` unchanged. Wraps the `deepspeed` launcher, which
# sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE / MASTER_ADDR / MASTER_PORT for every process.
# Extra launcher flags: DS_LAUNCHER_ARGS="--bind_cores_to_rank" (needs numactl), etc.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck disable=SC2086
"$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank \
  ${DS_LAUNCHER_ARGS:-} --module hope_scale.cli pretrain --config "$CONFIG" "$@"
