#!/usr/bin/env bash
# Pretrain on several machines listed in a DeepSpeed hostfile ("hostname slots=N" per line), started from
# the first of them. Needs passwordless ssh between the hosts, pdsh (DeepSpeed's default multi-node
# launcher; DS_LAUNCHER_ARGS="--launcher openmpi" for MPI), the same repository path and Python environment on
# every host, and checkpoint.dir / data paths on a filesystem that every host sees.
#
#   launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
#   launch/multi_node.sh hostfile configs/train/hope-1.3b.yaml checkpoint.dir=/shared/runs/1.3b/checkpoints
#
# MASTER_ADDR defaults to the first host of the hostfile; the config and overrides pass through unchanged.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
  exit 2
fi
HOSTFILE=$1
CONFIG=$2
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
fi
# shellcheck disable=SC2086
"$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --no_local_rank ${DS_LAUNCHER_ARGS:-} \
  --module hope_scale.cli pretrain --config "$CONFIG" "$@"
