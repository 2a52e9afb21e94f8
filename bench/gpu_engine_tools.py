"""bench/gpu_engine.py's instruments: per-step timing of LLMEngine.step() (StepTimer) and
torch.profiler runs summarized by kernel kind."""

from __future__ import annotations

import re
import time

import torch


class StepTimer:
    """Per engine.step() call: its wall time, the GPU time of the step it launched (CUDA events
    recorded before the launch and after the sampling: the GPU stamps them when it gets
    there, so under async scheduling this is the step's own GPU time, not the host's), and
    the time the call spent waiting for sampled tokens (runner.collect), so host CPU work =
    wall - wait."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.records: list[dict] = []
        runner = engine.runner
        launch, collect = runner.launch, runner.collect

        def timed_launch(chunks, sampling, prev):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
            start.record()
            out = launch(chunks, sampling, prev)
            end.record()
            ctx = sum(r.num_computed_tokens for r, _ in chunks)
            self._launched.append((start, end, len(chunks), sum(n for _, n in chunks), ctx))
            return out

        def timed_collect(launched):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = collect(launched)
            self._wait += time.perf_counter() - t0
            self._wait_cpu += time.thread_time() - c0
            return out

        runner.launch, runner.collect = timed_launch, timed_collect
        self._launched: list = []
        self._events = []
        self._wait = 0.0
        self._wait_cpu = 0.0  # CPU the waiting thread burns (CUDA's event wait spins)

    def close(self) -> None:
        del self.engine.runner.launch  # back to the class's methods
        del self.engine.runner.collect
        for rec, (start, end) in zip(self.records, self._events, strict=True):
            end.synchronize()
            rec["gpu_s"] = start.elapsed_time(end) / 1000

    def step(self):
        self._launched.clear()
        self._wait = 0.0
        self._wait_cpu = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.engine.step()
        wall = time.perf_counter() - t0
        # the step's own CPU time, less the wait's: work the thread did (not time it lost to
        # other processes on a shared host, which wall - wait counts)
        cpu = time.thread_time() - c0 - self._wait_cpu
        for start, end, batch, tokens, ctx in self._launched:
            self.records.append(
                {
                    "batch": batch,
                    "tokens": tokens,
                    "context_tokens": ctx,
                    "decode_only": tokens == batch,
                    "wall_s": wall,
                    "wait_s": self._wait,
                    "thread_cpu_s": cpu,
                }
            )
            self._events.append((start, end))
        return out


# kernel kinds, by the first pattern a kernel's name matches (cuBLAS/CUTLASS GEMM names vary
# with the version: nvjet, sm90_xmma, cutlass, gemm)
KERNEL_KINDS = [
    ("attention", r"_decode_split|_decode_reduce|_prefill_kernel|attention|attn|flash|fmha"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|matmul|sgemv|gemv|splitk|aten::(mm|addmm|bmm)$"),
    ("rms_norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("silu_mul", r"silu|act_and_mul|swiglu"),
    ("kv_write", r"_write_kv|kv_write|reshape_and_cache"),
    ("sampling", r"argmax|argmin|softmax|exponential|distribution|topk|sort|reduce_kernel"),
    ("copy", r"memcpy|memset|copy|index|gather|scatter|cat|fill"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def _device_time_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def summarize_profile(prof, steps: int, top: int = 12, cuda: bool = True) -> dict:
    """GPU time per step from a torch.profiler run of `steps` steps: totals by kernel kind and
    the top kernels by time (names cut to 90 characters). cuda=False (a CPU run): the aten
    ops' self CPU time instead."""
    kernels = []
    for evt in prof.key_averages():
        if cuda:
            us = _device_time_us(evt)
            on_device = "cuda" in str(getattr(evt, "device_type", "")).lower()
        else:
            us, on_device = float(evt.self_cpu_time_total), evt.key.startswith("aten::")
        if us > 0 and on_device:
            kernels.append((evt.key, us, evt.count))
    total = sum(us for _, us, _ in kernels)
    by_kind: dict[str, float] = {}
    for name, us, _ in kernels:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    kernels.sort(key=lambda k: -k[1])
    # the host's side: CPU time per step by op or runtime call (cudaGraphLaunch, the copies'
    # cudaMemcpyAsync, kernel launches), self time, so nested ops are not counted twice
    host = sorted(
        ((e.key, float(e.self_cpu_time_total), e.count) for e in prof.key_averages()),
        key=lambda k: -k[1],
    )
    return {
        "host_self_ms_per_step_top": [
            {
                "name": name[:60],
                "ms_per_step": round(us / steps / 1e3, 4),
                "calls_per_step": c / steps,
            }
            for name, us, c in host[:top]
            if us > 0
        ],
        "steps": steps,
        "gpu_ms_per_step": total / steps / 1e3,
        "by_kind_ms_per_step": {
            k: round(v / steps / 1e3, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {
                "name": name[:90],
                "kind": kind_of(name),
                "ms_per_step": round(us / steps / 1e3, 4),
                "calls_per_step": count / steps,
                "share": round(us / total, 4) if total else 0.0,
            }
            for name, us, count in kernels[:top]
        ],
    }


def sync_device(engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def profiled(engine, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    return summarize_profile(prof, steps, cuda=cuda)
