"""The loader in 2 real processes (gloo, one node, shared cache, a DataLoader worker each).

Phase 1: 2 DP ranks get disjoint batches, the same as the single-process simulation, and the same state.
Phase 2: the 2 processes form one DP replica (as tensor-parallel ranks would) and get identical batches.
Then the epoch is resumed here on 1 rank (elastic): nothing repeated, nothing skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hope_scale.parallel.launch import free_port
from tests.test_data_support import (  # noqa: F401
    N_SAMPLES,
    SEQ,
    clean_shared_memory,
    flat,
    run_ranks,
    sample_keys,
    small_dataset,
    streaming_tmp,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
BATCH = 4


def rank_main(out_dir: str, data: str) -> None:
    """Body of one rank (run in a subprocess by the test below)."""
    import torch.distributed as dist

    from hope_scale.data.loader import build_train_loader

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    cfg = {"path": data, "num_workers": 1}
    dp_loader = build_train_loader({**cfg, "cache_dir": f"{out_dir}/cache-dp"}, seq_len=SEQ, micro_batch_size=BATCH,
                                   dp_rank=rank, dp_world_size=2, seed=17)
    dp_steps = [[k.hex() for k in sample_keys(*next(dp_loader))] for _ in range(STEPS)]
    state = dp_loader.state_dict()
    replica = build_train_loader({**cfg, "cache_dir": f"{out_dir}/cache-replica"}, seq_len=SEQ,
                                 micro_batch_size=BATCH, dp_rank=0, dp_world_size=1, seed=17)
    replica_steps = [[k.hex() for k in sample_keys(*next(replica))] for _ in range(STEPS)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"dp": dp_steps, "state": state, "replica": replica_steps}))
    dp_loader.close()
    replica.close()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads, DataLoader workers)


@pytest.mark.slow
@pytest.mark.usefixtures("clean_shared_memory")
def test_two_processes(small_dataset, tmp_path, streaming_tmp):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TMPDIR": str(streaming_tmp)}
        code = "import sys; from tests.test_data_multirank import rank_main; rank_main(sys.argv[1], sys.argv[2])"
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(small_dataset)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    dp = [[[bytes.fromhex(k) for k in step] for step in r["dp"]] for r in ranks]
    assert not set(flat(dp[0])) & set(flat(dp[1]))  # different DP ranks: disjoint samples
    simulated, state = run_ranks(small_dataset, tmp_path, "sim", dp=2, batch=BATCH, steps=STEPS)
    assert [a + b for a, b in zip(dp[0], dp[1])] == simulated  # same as one process per rank-cache
    assert ranks[0]["state"] == ranks[1]["state"] == state
    assert ranks[0]["replica"] == ranks[1]["replica"]  # one DP replica (e.g. TP=2): identical batches

    rest, end = run_ranks(small_dataset, tmp_path, "elastic", dp=1, batch=2 * BATCH,
                          steps=(N_SAMPLES - 2 * BATCH * STEPS) // (2 * BATCH), state=ranks[0]["state"])
    full, _ = run_ranks(small_dataset, tmp_path, "full", dp=2, batch=BATCH, steps=N_SAMPLES // (2 * BATCH))
    assert Counter(flat(dp[0]) + flat(dp[1]) + flat(rest)) == Counter(flat(full))
    assert end["sample_in_epoch"] == N_SAMPLES
