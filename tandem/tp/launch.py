"""Rank 0 starts ranks 1..N-1 as child processes (`python -m tandem.tp.worker`).

    rank 0 (engine)                          rank r (child)
    TCPStore on 127.0.0.1, free port  <----  connects (MASTER_ADDR/MASTER_PORT), sets ready/r
    waits for every ready/r, failing fast if a child exits
    init_groups (collective)          <--->  init_groups
    ModelRunner (loads its shard, MIN of block counts, graph capture: all collectives, in order)
    engine steps: StepSync.send_step  ---->  ModelRunner.serve_worker
    shutdown: StepSync.send_stop      ---->  returns, exits 0

Children die with rank 0: PR_SET_PDEATHSIG (worker.py). If a child dies first, rank 0 cannot run
another forward (its collectives would wait on the dead rank), so a watchdog ends rank 0 too and
the supervisor (compose, Kubernetes, the caller) restarts the whole worker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.config import EngineConfig
from tandem.tp.group import TPGroup, destroy_groups, init_groups

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0  # children import torch and connect; weights load after this
SPEC_ENV = "TANDEM_TP_SPEC"  # JSON: the engine config and what the children must not re-derive


def cpu_threads_per_rank(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)


class TPWorkers:
    """Ranks 1..N-1 of one engine, and the process groups they share with it."""

    def __init__(
        self, cfg: EngineConfig, model_dir: Path, hf_config: dict, max_model_len: int
    ) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "a tensor-parallel engine already runs in this process; shut it down first"
            )
        size = cfg.tensor_parallel_size
        device = cfg.torch_device(0)  # validates the GPU count before anything starts
        self._stopping = False
        self._num_threads = torch.get_num_threads()
        if device.type == "cpu":
            # the ranks share the host's cores (each child does the same, worker.py): more
            # threads than cores make every collective wait on a descheduled rank
            torch.set_num_threads(cpu_threads_per_rank(size))
        self.store = dist.TCPStore(
            "127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )  # fmt: skip
        spec = {
            "engine": asdict(cfg),
            "model_dir": str(model_dir),
            "hf_config": hf_config,
            "max_model_len": max_model_len,
            "parent_pid": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        root = str(Path(__file__).resolve().parents[2])  # where `tandem` is importable from
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.store.port),
            "WORLD_SIZE": str(size),
            SPEC_ENV: json.dumps(spec),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tandem.tp.worker"], env={**env, "RANK": str(r)}
            )
            for r in range(1, size)
        ]
        try:
            self._wait_ready(size)
            self.group: TPGroup = init_groups(0, size, self.store, device)
        except BaseException:
            self._kill()
            torch.set_num_threads(self._num_threads)
            raise
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        log.info("event=tp_started size=%d port=%d", size, self.store.port)

    def _wait_ready(self, size: int) -> None:
        keys = [f"ready/{r}" for r in range(1, size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            for r, p in enumerate(self.procs, start=1):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"tensor-parallel rank {r} exited with code {p.returncode} while"
                        " starting (its stderr is above)"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks not ready after {STARTUP_TIMEOUT_S}s")
            time.sleep(0.05)

    def _watch(self) -> None:
        while True:
            for r, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self._stopping:
                    log.critical(
                        "event=tp_rank_died rank=%d code=%s exiting=True",
                        r, code,
                    )  # fmt: skip
                    os._exit(70)
            if self._stopping:
                return
            time.sleep(0.5)

    def stop(self, send_stop) -> None:
        """send_stop: tells the other ranks' loops to return (the runner's StepSync)."""
        if self._stopping:
            return
        self._stopping = True
        try:
            send_stop()
            for p in self.procs:
                p.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck or dead rank: kill, then tear down
            log.exception("event=tp_stop_failed")
        finally:
            self._kill()
            destroy_groups()
            torch.set_num_threads(self._num_threads)

    def _kill(self) -> None:
        self._stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
