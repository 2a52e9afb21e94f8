"""The child processes of `tandem serve`: started once, restarted when they exit, stopped together.

A child that exits while serve runs (killed, crashed, or drained after a SIGTERM of its own)
is started again with the same command on the same host:port, after a backoff that doubles
from `Backoff.initial_s` to `Backoff.max_s` and starts over once a child had run for
`Backoff.reset_after_s`: a worker the router polls comes back into its pool, a router comes
back where its gateways reconnect, and a child that crashes at every start is retried ever
more slowly instead of in a tight loop. Nothing is restarted once `stop()` has begun.

Every start (the first and each restart) prints one line to stdout, for whoever runs serve
(tests, scripts) to find each child's pid without reading logs:

    event=child_started role=decode index=0 address=127.0.0.1:PORT pid=N restarts=0
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

log = logging.getLogger("tandem.serve")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0  # the first restart after a child ran fine
    max_s: float = 30.0  # doubling stops here
    # A child that ran this long before it exited counts as healthy: its next restart waits
    # initial_s again. Longer than a model load, so a crash right after loading still backs off.
    reset_after_s: float = 120.0

    def next_delay(self, last_delay_s: float, uptime_s: float) -> float:
        if last_delay_s <= 0 or uptime_s >= self.reset_after_s:
            return self.initial_s
        return min(last_delay_s * 2, self.max_s)


@dataclass
class Child:
    role: str  # decode | prefill | router | gateway
    index: int  # among the children of its role
    address: str  # host:port it serves on; the same after every restart
    cmd: list[str]
    env: dict[str, str] | None = None  # None: serve's own environment
    on_exit: Callable[[int], None] | None = None  # gets the pid of a process that ended
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    num_restarts: int = 0
    delay_s: float = 0.0  # the backoff before the latest restart (0: none yet)
    restart_at: float | None = None  # due for a restart at this monotonic time

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> str:
        return f"role={self.role} index={self.index} address={self.address}"


@dataclass
class Supervisor:
    backoff: Backoff = field(default_factory=Backoff)
    stop_timeout_s: float = 20.0  # SIGTERM, then SIGKILL for whatever still runs after this
    out: TextIO = field(default_factory=lambda: sys.stdout)
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def start(self, child: Child) -> Child:
        """Start a new child (serve's startup); it is supervised from now on."""
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = time.monotonic()
        try:
            child.proc = subprocess.Popen(child.cmd, env=child.env)
        except OSError as e:  # the executable vanished, out of pids: retry like a crash
            child.proc = None
            log.warning("event=child_spawn_failed %s error=%r", child.describe(), str(e))
            self._schedule(child, uptime_s=0.0)
            return
        print(
            f"event=child_started {child.describe()} pid={child.proc.pid} "
            f"restarts={child.num_restarts}",
            file=self.out,
            flush=True,
        )

    def _schedule(self, child: Child, uptime_s: float) -> None:
        child.delay_s = self.backoff.next_delay(child.delay_s, uptime_s)
        child.restart_at = time.monotonic() + child.delay_s

    def poll(self) -> None:
        """Notice children that exited and restart those whose backoff has passed."""
        if self.stopping:
            return
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is None and child.proc is not None:
                code = child.proc.poll()
                if code is None:
                    continue
                uptime = now - child.started_at
                self._schedule(child, uptime)
                log.warning(
                    "event=child_exited %s pid=%d returncode=%d uptime_s=%.1f restart_in_s=%.1f",
                    child.describe(), child.proc.pid, code, uptime, child.delay_s,
                )  # fmt: skip
                if child.on_exit is not None:
                    child.on_exit(child.proc.pid)
            if child.restart_at is not None and now >= child.restart_at:
                child.num_restarts += 1
                old_pid = child.pid
                self._spawn(child)
                if child.proc is not None:
                    log.info(
                        "event=child_restarted %s pid=%d old_pid=%s restarts=%d backoff_s=%.1f",
                        child.describe(), child.proc.pid, old_pid, child.num_restarts,
                        child.delay_s,
                    )  # fmt: skip

    def run(self, should_stop: Callable[[], bool], interval_s: float = 0.2) -> None:
        """Supervise until should_stop() says so (a signal handler sets what it reads)."""
        while not should_stop():
            self.poll()
            time.sleep(interval_s)

    def stop(self) -> None:
        """SIGTERM to every live child (the latest started first: gateways before routers
        before workers), wait up to stop_timeout_s in all, then SIGKILL what remains."""
        self.stopping = True
        live = [c.proc for c in reversed(self.children) if c.proc and c.proc.poll() is None]
        for proc in live:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("event=child_killed pid=%d reason=stop_timeout", proc.pid)
                proc.kill()
                proc.wait()


class StopSignal:
    """SIGINT/SIGTERM of serve. During startup they raise (a health wait can take minutes);
    while supervising they only set `signum`, which the loop reads, so a restart is never cut
    off between starting a process and recording it."""

    def __init__(self) -> None:
        self.signum = 0
        self.raising = True

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        if self.raising:
            raise KeyboardInterrupt


def metrics_cleanup(metrics_dir: str):
    """A gateway gone: its live gauges leave the shared /metrics (its counters stay)."""

    def mark(pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)

    return mark
