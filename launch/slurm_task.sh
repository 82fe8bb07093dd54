#!/usr/bin/env bash
# One SLURM task of a pretraining job (started by `srun` in launch/slurm.sbatch): maps SLURM's task
# variables onto the launcher variables hope-scale reads, then runs `hope-scale pretrain` with the
# arguments unchanged.   launch/slurm_task.sh CONFIG [key=value ...]
# SIGTERM / SIGINT reach the trainer (which saves a checkpoint and exits 0) and this script waits for it, so the
# task ends only when the save is complete.
set -euo pipefail
CONFIG=$1
shift
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}
export LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE%%(*}   # "8(x2)" -> "8"
: "${MASTER_ADDR:?set by launch/slurm.sbatch}" "${MASTER_PORT:?set by launch/slurm.sbatch}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_forwarding_signals "$PYTHON" -m hope_scale.cli pretrain --config "$CONFIG" "$@"
