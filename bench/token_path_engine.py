"""The stand-in engine and the meters of bench/decode_token_path.py (see there).

StepEngine models a GPU engine on CPU: each step holds the GIL for its host part (a fixed
amount of Python work) and sleeps through its GPU part, so whatever else takes the GIL during
the host part lengthens the step. The meters read what a run cost: CPU per thread, the cyclic
collector's time, the mean step while the batch is full.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

from tandem.engine_records import EngineFullError, StepOutput
from tandem.records import Logprob


# -- the stand-in engine -------------------------------------------------------------------------
def _spin(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


def calibrate_spin(ms: float) -> int:
    """Iterations of _spin that take `ms` on this core when nothing else runs (best of 5)."""
    n = 200_000
    best = min(_timed(_spin, n) for _ in range(5))
    return max(1, int(n * ms / 1e3 / best))


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


class _Req:
    __slots__ = ("req_id", "max_tokens", "num_output", "logprobs")

    def __init__(self, req_id: str, max_tokens: int, logprobs: int | None) -> None:
        self.req_id = req_id
        self.max_tokens = max_tokens
        self.num_output = 0
        self.logprobs = logprobs


class StepEngine:
    """LLMEngine's serving surface with a modelled step: spin (GIL held), sleep (released).

    Output token i of every request is i (the client checks order, loss and duplication)."""

    def __init__(self, spin_iters: int, gpu_ms: float, max_num_seqs: int = 4096) -> None:
        self.spin_iters = spin_iters
        self.gpu_s = gpu_ms / 1e3
        self.max_num_seqs = max_num_seqs
        self.max_num_waiting: int | None = None  # AsyncEngine sets it
        self.requests: dict[str, _Req] = {}
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.step_log: list[tuple[float, int]] = []  # (start, requests running this step)

    def add_request(self, req_id, prompt_token_ids, params, hold_blocks=False, num_out=0):
        if self.max_num_waiting is not None and len(self.waiting) >= self.max_num_waiting:
            raise EngineFullError(f"{len(self.waiting)} requests are already waiting")
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt must have at least one token")
        req = _Req(req_id, params.max_tokens or 16, params.logprobs)
        self.requests[req_id] = req
        self.waiting.append(req)
        return req

    def abort(self, req_id: str) -> bool:
        req = self.requests.pop(req_id, None)
        if req is None:
            return False
        for q in (self.waiting, self.running):
            if req in q:
                q.remove(req)
        return True

    def shutdown(self) -> None:  # AsyncEngine.shutdown's call (tensor-parallel ranks: none)
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[StepOutput]:
        t = time.perf_counter()
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        self.step_log.append((t, len(self.running)))
        _spin(self.spin_iters)  # host part: scheduler, inputs, sampling bookkeeping
        time.sleep(self.gpu_s)  # GPU part: the engine thread waits, the loop runs
        outputs, still = [], []
        for req in self.running:
            token = req.num_output
            req.num_output += 1
            lp = Logprob(token, -0.5, [(token, -0.5)] * req.logprobs) if req.logprobs else None
            done = req.num_output >= req.max_tokens
            outputs.append(StepOutput(req.req_id, [token], [lp], "length" if done else None, 0))
            if done:
                del self.requests[req.req_id]
            else:
                still.append(req)
        self.running = still
        return outputs


def mean_full_step_ms(log: list[tuple[float, int]], n: int) -> tuple[float, int]:
    """Mean wall between consecutive step starts while (nearly) all n requests run: >= 90 %,
    so a client that ramps up slowly on a loaded machine still leaves a steady window."""
    full = 0.9 * n
    pairs = zip(log, log[1:], strict=False)
    gaps = [b[0] - a[0] for a, b in pairs if a[1] >= full and b[1] >= full]
    return (1e3 * sum(gaps) / len(gaps) if gaps else float("nan")), len(gaps)


def thread_cpu_s(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU of the loop thread, the engine thread and the rest of this process over a run."""

    def __init__(self, engine_tid: int) -> None:
        self.tids = {"loop": threading.get_native_id(), "engine": engine_tid}
        self.t0 = {k: thread_cpu_s(t) for k, t in self.tids.items()}
        self.p0, self.w0 = process_cpu_s(), time.perf_counter()
        self.gc = GcMeter()

    def stop(self, num_tokens: int) -> dict:
        used = {k: thread_cpu_s(t) - self.t0[k] for k, t in self.tids.items()}
        used["other"] = process_cpu_s() - self.p0 - used["loop"] - used["engine"]
        wall = time.perf_counter() - self.w0
        out = {"wall_s": round(wall, 3), "tokens": num_tokens, **self.gc.stop()}
        for k, v in used.items():
            out[f"{k}_cores"] = round(v / wall, 3)
            out[f"{k}_us_per_token"] = round(1e6 * v / max(num_tokens, 1), 2)
        return out


class GcMeter:
    """Time the cyclic collector spends (any thread) and how often it runs, per generation."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = 0.0
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.count[info["generation"]] += 1

    def stop(self) -> dict:
        gc.callbacks.remove(self._cb)
        return {"gc_collections_by_gen": self.count, "gc_ms": round(1e3 * self.seconds, 1)}
