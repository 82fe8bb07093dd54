# Shared by the launch scripts (sourced, not run): the Python to use and CPU-only settings.
#   PYTHON       interpreter with hope-scale installed (default: the repository's .venv if present, else python3)
#   MASTER_PORT  rendezvous port (default: a free one on this host)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
# No GPU: DeepSpeed's CPU accelerator (gloo). Harmless on GPU machines, where CUDA is found first.
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
export MASTER_PORT

# DeepSpeed's CPU all-reduce leaves a ~69 MB shared-memory buffer per local rank behind (on this host):
# remove this job's when the script exits, however it exits.
cleanup_deepspeed_shm() {
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"${MASTER_PORT}"_* 2>/dev/null || true
}
trap cleanup_deepspeed_shm EXIT

# Run a command in the background and pass SIGTERM / SIGINT on to it, returning its exit code once it has
# finished: the script does not end (and its launcher does not count the task as done) while the trainer still
# saves the checkpoint the signal asked for.
run_forwarding_signals() {
  "$@" &
  local child=$! rc=0
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  trap 'kill -INT "$child" 2>/dev/null || true' INT
  while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done  # a trapped signal interrupts wait
  wait "$child" || rc=$?
  trap - TERM INT
  return "$rc"
}
