"""Main of a tensor-parallel rank > 0 (started by launch.py): load this rank's shard, then run
the forward of every step rank 0 broadcasts, until it says stop."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.config import EngineConfig, ModelConfig
from tandem.log_config import configure_logging
from tandem.runner import ModelRunner
from tandem.tp.group import destroy_groups, init_groups
from tandem.tp.launch import SPEC_ENV, STARTUP_TIMEOUT_S, cpu_threads_per_rank

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when rank 0 exits, however it exits (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: a dead rank 0 still ends us through the broken gloo connection
    if os.getppid() != parent_pid:  # rank 0 died before prctl took effect
        sys.exit(1)


def main() -> None:
    spec = json.loads(os.environ[SPEC_ENV])
    _die_with_parent(spec["parent_pid"])
    configure_logging(spec["log_level"])
    # SIGINT (Ctrl-C reaches the whole process group): rank 0 decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = EngineConfig(**spec["engine"])
    if cfg.torch_device(rank).type == "cpu":
        # the ranks share the host's cores: without this each would start one thread per core
        torch.set_num_threads(cpu_threads_per_rank(size))
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )  # fmt: skip
    store.set(f"ready/{rank}", "1")
    tp = init_groups(rank, size, store, cfg.torch_device(rank))
    model_cfg = ModelConfig.from_hf(spec["hf_config"])
    runner = ModelRunner(cfg, model_cfg, Path(spec["model_dir"]), spec["max_model_len"], tp)
    runner.serve_worker()
    destroy_groups()


if __name__ == "__main__":
    main()
