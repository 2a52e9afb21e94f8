"""The decode server's token path on CPU: how much a step stretches when every token is
streamed, with the engine modelled as a GPU engine that holds the GIL only for its host part.

    client process                         this process (the measured decode server)
    --------------                         ------------------------------------------
    N Generate streams  <--gRPC 127.0.0.1-- grpc.aio server: InFlightRpcs + DecodeServicer
    (prefill_locally,                         event loop: deliver, convert, write
     consume at once)                         engine thread: AsyncEngine._loop -> StepEngine.step
                                                  H ms of Python (holds the GIL), then
                                                  G ms of sleep (the GPU part, GIL released)

StepEngine stands in for LLMEngine (the methods AsyncEngine and the servicer call, same
admission and abort rules) and emits one token per running request per step; its host part
is a fixed amount of work (calibrated to H ms when nothing else runs), so every
microsecond the event loop takes the GIL during it lengthens the step. Per N the script runs:

    engine alone:  N requests added straight to the engine, no streams (no consumer work)
    delivery only: N in-process consumers of the engine's output streams that do nothing
                   (the loop's cost of handing tokens over, no protobuf, no gRPC)
    streams:       N Generate streams from a separate client process (its own GIL)
    session:       the same N requests on one Decode.Session stream (the router's path):
                   one message per step carries every request's tokens

and reports the engine's mean step time while all N run (wall between step starts, on the
engine thread), tokens/s, and CPU per token of the event-loop thread, the engine thread and
the rest (gRPC core). --profile repeats the stream run under py-spy (loop thread's top
functions) when py-spy is installed, else cProfile on the loop thread.

    python bench/decode_token_path.py --out bench/results/decode-token-path-cpu2-X.json
    python bench/decode_token_path.py --streams 512 --profile
    python bench/decode_token_path.py --code-root /tmp/before   # the same run on other code
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code_root(argv: list[str]) -> Path:
    """--code-root picks the tree whose decode server is measured (before/after runs)."""
    if "--code-root" in argv:
        return Path(argv[argv.index("--code-root") + 1]).resolve()
    return ROOT


sys.path.insert(0, str(_code_root(sys.argv)))
sys.path.insert(1, str(ROOT / "bench"))

import grpc  # noqa: E402

from decode_service import worker_common  # noqa: E402
from decode_service.servicer import DecodeServicer  # noqa: E402
from kvtransfer.grpc_transport import CHANNEL_OPTIONS  # noqa: E402
from kvtransfer.ledger import HandoffLedger  # noqa: E402
from protos import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402
from tandem.async_engine import AsyncEngine  # noqa: E402
from tandem.engine import EngineFullError, StepOutput  # noqa: E402
from tandem.request import Logprob  # noqa: E402
from worker.drain import InFlightRpcs  # noqa: E402


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


# -- one measured server ---------------------------------------------------------------------------
class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.spin_iters = calibrate_spin(args.host_ms)

    async def start(self):
        self.fake = StepEngine(self.spin_iters, self.args.gpu_ms)
        self.engine = AsyncEngine(self.fake, max_num_waiting=None)
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[InFlightRpcs()])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        servicer = DecodeServicer(self.engine, HandoffLedger(lease_s=60), self.address)
        worker_pb2_grpc.add_DecodeServicer_to_server(servicer, self.server)
        _gc_setup(self.args)
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(None)
        self.engine.shutdown()

    def _step_stats(self, n: int) -> dict:
        ms, gaps = mean_full_step_ms(self.fake.step_log, n)
        peak = max((r for _, r in self.fake.step_log), default=0)
        self.fake.step_log.clear()
        return {"mean_step_ms": round(ms, 3), "steps_measured": gaps, "peak_running": peak}

    async def engine_alone(self, n: int) -> dict:
        from tandem.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=self.args.tokens, ignore_eos=True)
        meter = CpuMeter(self.engine._thread.native_id)
        add = self.fake.add_request  # all queued at once: they join the same step
        await asyncio.gather(
            *(self.engine.call(add, f"a-{i}", [1, 2, 3], params) for i in range(n))
        )
        while self.fake.has_unfinished():
            await asyncio.sleep(0.05)
        return {**self._step_stats(n), **meter.stop(n * self.args.tokens)}

    async def delivery_only(self, n: int) -> dict:
        """N in-process consumers that take each output and do nothing: the loop's cost of
        delivery alone (engine thread -> loop -> consumer), without protobuf or gRPC."""
        from tandem.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=self.args.tokens, ignore_eos=True)
        num_tokens = [0]

        async def consume(i: int) -> None:
            open_stream = getattr(self.engine, "open_stream", None)  # the servicer's path
            if open_stream is None:
                stream = self.engine.generate(f"d-{i}", [1, 2, 3], params)
            else:
                stream = await open_stream(f"d-{i}", [1, 2, 3], params)
            async for out in stream:
                num_tokens[0] += len(out.new_token_ids)

        meter = CpuMeter(self.engine._thread.native_id)
        await asyncio.gather(*(consume(i) for i in range(n)))
        return {**self._step_stats(n), **meter.stop(num_tokens[0])}

    async def streams(self, n: int, profile: str | None = None, api: str = "generate") -> dict:
        self.fake.step_log.clear()
        cmd = [sys.executable, __file__, "--code-root", str(_code_root(sys.argv))]
        cmd += ["--client", self.address, "--streams", str(n), "--tokens", str(self.args.tokens)]
        cmd += ["--logprobs", str(self.args.logprobs), "--client-api", api]
        client = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
        await client.stdout.readline()  # connected: its imports are not part of the run
        meter = CpuMeter(self.engine._thread.native_id)
        spy = await self._start_profile(profile)
        out, _ = await client.communicate()
        res = {**self._step_stats(n), **meter.stop(n * self.args.tokens)}
        if client.returncode != 0:
            raise RuntimeError(f"client failed (exit {client.returncode})")
        res["client"] = json.loads(out)
        res["tokens_per_s"] = res["client"]["tokens_per_s"]
        # a client that lags gets several tokens per message: per message is the fair unit
        per_msg = res["tokens"] / res["client"]["messages"]
        res["loop_us_per_message"] = round(res["loop_us_per_token"] * per_msg, 2)
        if spy is not None:
            res["profile"] = await spy()
        return res

    async def _start_profile(self, kind: str | None):
        if kind is None:
            return None
        if kind == "cprofile":
            import cProfile
            import pstats

            prof = cProfile.Profile()  # the loop thread only: the engine thread is not traced
            prof.enable()

            async def finish():
                prof.disable()
                st = pstats.Stats(prof)
                rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
                return {
                    "kind": "cprofile (loop thread, tottime)",
                    "top": [[pstats.func_std_string(f), round(v[2], 3), v[1]] for f, v in rows],
                }

            return finish
        from control_plane import py_spy, top_functions

        tmp = Path(tempfile.mkdtemp())
        raw = tmp / "loop.txt"
        cmd = [py_spy(), "record", "--pid", str(os.getpid()), "--rate", "200"]
        # --native: the C frames (gRPC core, protobuf, the C task step); it pauses the process
        # at each sample, so the profiled run's own numbers are not comparable
        cmd += ["--native"] if self.args.profile_native else ["--nonblocking"]
        cmd += ["--format", "raw", "--output", str(raw)]
        cmd += ["--duration", str(self.args.profile_seconds)]
        await asyncio.sleep(1.0)  # into the steady state
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL)

        async def finish():
            await proc.wait()
            # the event loop's samples only (the engine thread's spin would top every list)
            loop_raw = tmp / "loop-only.txt"
            lines = raw.read_text().splitlines()
            loop_raw.write_text("\n".join(ln for ln in lines if "_run_server" in ln) + "\n")
            return {"kind": "py-spy, event-loop thread", **top_functions(loop_raw, n=25)}

        return finish


async def serve_and_measure(args) -> dict:
    bench = Bench(args)
    await bench.start()
    runs: dict = {}
    try:
        for n in args.streams:
            alone = await bench.engine_alone(n)
            delivery = await bench.delivery_only(n)
            streamed = await bench.streams(n)
            runs[str(n)] = {
                "engine_alone": alone,
                "delivery_only": delivery,
                "streams": streamed,
                "step_ratio_streams_vs_alone": round(
                    streamed["mean_step_ms"] / alone["mean_step_ms"], 3
                ),
            }
            if "session" in args.apis:
                session = await bench.streams(n, api="session")
                runs[str(n)]["session"] = session
                runs[str(n)]["step_ratio_session_vs_alone"] = round(
                    session["mean_step_ms"] / alone["mean_step_ms"], 3
                )
            print(json.dumps({n: _brief(runs[str(n)])}), file=sys.stderr, flush=True)
        if args.profile:
            kind = "py-spy" if _have_py_spy() else "cprofile"
            runs["profile"] = await bench.streams(args.streams[-1], kind, args.apis[-1])
    finally:
        await bench.stop()
    return {"spin_iters_for_host_ms": bench.spin_iters, "runs": runs}


def _brief(run: dict) -> dict:
    s, a, d = run["streams"], run["engine_alone"], run["delivery_only"]
    return {
        "alone_ms": a["mean_step_ms"],
        "delivery_loop_us_tok": d["loop_us_per_token"],
        "streams_ms": s["mean_step_ms"],
        "ratio": run["step_ratio_streams_vs_alone"],
        "tok_s": s["tokens_per_s"],
        "loop_us_tok": s["loop_us_per_token"],
        "loop_us_msg": s["loop_us_per_message"],
        "gc_ms": s["gc_ms"],
        "gc_n": s["gc_collections_by_gen"],
        **(
            {
                "session_ms": run["session"]["mean_step_ms"],
                "session_ratio": run["step_ratio_session_vs_alone"],
                "session_tok_s": run["session"]["tokens_per_s"],
                "session_loop_us_tok": run["session"]["loop_us_per_token"],
            }
            if "session" in run
            else {}
        ),
    }


def _have_py_spy() -> bool:
    try:
        from control_plane import py_spy

        return py_spy() is not None
    except ImportError:
        return False


# -- the client process --------------------------------------------------------------------------
async def client_main(args) -> dict:
    channel = grpc.aio.insecure_channel(args.client, options=CHANNEL_OPTIONS)
    stub = worker_pb2_grpc.DecodeStub(channel)
    sampling = common_pb2.SamplingParams(
        max_tokens=args.tokens, ignore_eos=True, logprobs=bool(args.logprobs)
    )
    sampling.top_logprobs = args.logprobs
    await channel.channel_ready()
    print("ready", flush=True)
    errors: list[str] = []
    last = [0.0]

    async def one(i: int) -> int:
        req = worker_pb2.DecodeRequest(
            req_id=f"s-{i}", prompt_token_ids=[1, 2, 3], sampling=sampling, prefill_locally=True
        )
        call = stub.Generate(req)
        tokens: list[int] = []
        msgs, finish = 0, 0
        async for ev in call:
            msgs += 1
            tokens.extend(ev.tokens.token_ids)
            finish = ev.tokens.finish_reason
            if args.logprobs and len(ev.tokens.logprobs) != len(ev.tokens.token_ids):
                errors.append(f"s-{i}: logprobs not parallel to token_ids")
        last[0] = time.perf_counter()
        if tokens != list(range(args.tokens)) or finish != common_pb2.FINISH_REASON_LENGTH:
            errors.append(f"s-{i}: {len(tokens)} tokens, finish {finish}")
        return msgs

    num_streams = args.streams[0]
    t0 = time.perf_counter()
    if args.client_api == "session":
        msgs = [await _session_client(stub, args, sampling, num_streams, errors, last)]
    else:
        msgs = await asyncio.gather(*(one(i) for i in range(num_streams)))
    await channel.close()
    wall = last[0] - t0
    if errors:
        raise SystemExit(f"wrong streams ({len(errors)}): {errors[:3]}")
    n_tok = num_streams * args.tokens
    return {
        "wall_s": round(wall, 3),
        "tokens_per_s": round(n_tok / wall, 1),
        "messages": sum(msgs),
        "tokens_per_message": round(n_tok / sum(msgs), 3),
    }


async def _session_client(stub, args, sampling, num_streams, errors, last) -> int:
    """The N requests on one Session; the number of messages read."""

    async def requests():
        for i in range(num_streams):
            req = worker_pb2.DecodeRequest(
                req_id=f"s-{i}", prompt_token_ids=[1, 2, 3], sampling=sampling,
                prefill_locally=True,
            )  # fmt: skip
            yield worker_pb2.SessionRequest(generate=req)
        await done.wait()  # half-close only once every request ended

    done = asyncio.Event()
    tokens: dict[str, list[int]] = {}
    finish: dict[str, int] = {}
    call = stub.Session(requests())
    msgs = 0
    while len(finish) < num_streams:
        batch = await call.read()
        if batch is grpc.aio.EOF:
            break
        msgs += 1
        for ev in batch.events:
            t = ev.tokens
            tokens.setdefault(ev.req_id, []).extend(t.token_ids)
            if args.logprobs and len(t.logprobs) != len(t.token_ids):
                errors.append(f"{ev.req_id}: logprobs not parallel to token_ids")
            if t.finish_reason or ev.WhichOneof("event") == "error":
                finish[ev.req_id] = t.finish_reason
    last[0] = time.perf_counter()
    done.set()
    await call.code()
    for i in range(num_streams):
        rid = f"s-{i}"
        if (
            tokens.get(rid) != list(range(args.tokens))
            or finish.get(rid) != common_pb2.FINISH_REASON_LENGTH
        ):
            errors.append(f"{rid}: {len(tokens.get(rid, []))} tokens, finish {finish.get(rid)}")
    return msgs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[256, 512])
    p.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--host-ms", type=float, default=3.0, help="engine step: GIL-held part")
    p.add_argument("--gpu-ms", type=float, default=12.0, help="engine step: GIL-free part")
    p.add_argument("--logprobs", type=int, default=0, help="top_logprobs per token (0: none)")
    p.add_argument("--profile", action="store_true", help="one more stream run, profiled")
    p.add_argument("--profile-seconds", type=int, default=5)
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--code-root", default=str(ROOT), help="tree whose decode server is measured")
    p.add_argument(
        "--loop", choices=["worker", "asyncio", "uvloop"], default="worker", help="event loop"
    )
    p.add_argument(
        "--gc",
        default="worker",
        help="worker (as the worker does) | default (untouched) | freeze | threshold=N",
    )
    p.add_argument(
        "--apis",
        nargs="+",
        choices=["generate", "session"],
        default=["generate", "session"],
        help="client APIs measured per N (Generate streams always; Session if listed); "
        "--profile profiles the last one",
    )
    p.add_argument("--client-api", default="generate", help=argparse.SUPPRESS)
    p.add_argument("--label", default="")
    p.add_argument("--out", default="")
    p.add_argument("--client", default="", help=argparse.SUPPRESS)  # the client process
    args = p.parse_args()
    if args.client:
        try:
            import uvloop  # the client must outpace the server: the cheapest loop there is
        except ImportError:
            res = asyncio.run(client_main(args))
        else:
            res = uvloop.run(client_main(args))
        print(json.dumps(res))
        return
    from control_plane import machine

    started = time.time()
    result = {
        "bench": "decode_token_path",
        "label": args.label,
        "code_root": str(_code_root(sys.argv)),
        "settings": {
            k: getattr(args, k)
            for k in ("streams", "tokens", "host_ms", "gpu_ms", "logprobs", "loop", "gc", "apis")
        },
        "machine": machine(),
        **_run_server(args),
        "elapsed_s": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def _run_server(args) -> dict:
    """As the decode worker runs (its switch interval, event loop and GC settings, where the
    measured tree has them); --loop / --gc override them to measure one idea at a time."""
    sys.setswitchinterval(worker_common.GIL_SWITCH_INTERVAL_S)
    runner = getattr(worker_common, "run_event_loop", asyncio.run)
    if args.loop == "asyncio":
        runner = asyncio.run
    elif args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    return runner(serve_and_measure(args))


def _gc_setup(args) -> None:
    """Called where the worker calls it: after the engine and servicer exist."""
    freeze = getattr(worker_common, "freeze_startup_heap", None)
    if args.gc == "worker" and freeze is not None:
        freeze()
    elif args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc.startswith("threshold="):
        gc.collect()
        gc.freeze()
        gc.set_threshold(int(args.gc.split("=", 1)[1]), *gc.get_threshold()[1:])


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


if __name__ == "__main__":
    main()
