"""The decode server's token path on CPU: how much a step stretches when every token is
streamed, with the engine modelled as a GPU engine that holds the GIL only for its host part.

    client process                         this process (the measured decode server)
    --------------                         ------------------------------------------
    N requests on one   <--gRPC 127.0.0.1-- grpc.aio server: InFlightRpcs + DecodeServicer
    Decode.Session                            event loop: deliver, convert, write
    (prefill_locally,                         engine thread: AsyncEngine._loop -> StepEngine.step
     consume at once)                             H ms of Python (holds the GIL), then
                                                  G ms of sleep (the GPU part, GIL released)

StepEngine (bench/token_path_engine.py) stands in for LLMEngine (the methods AsyncEngine and
the servicer call, same admission and abort rules) and emits one token per running request per
step; its host part is a fixed amount of work (calibrated to H ms when nothing else runs), so
every microsecond the event loop takes the GIL during it lengthens the step. Per N the script
runs:

    engine alone:  N requests added straight to the engine, no streams (no consumer work)
    delivery only: N in-process consumers of the engine's output streams that do nothing
                   (the loop's cost of handing tokens over, no protobuf, no gRPC)
    session:       N requests on one Decode.Session stream (the router's path) from a
                   separate client process (its own GIL): one message per step carries every
                   request's tokens

and reports the engine's mean step time while all N run (wall between step starts, on the
engine thread), tokens/s, and CPU per token of the event-loop thread, the engine thread and
the rest (gRPC core). --profile repeats the stream run under py-spy (loop thread's top
functions) when py-spy is installed, else cProfile on the loop thread.
It needs no GPU (the engine is modelled); results differ by machine, so compare runs made on
the same one.

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
from token_path_engine import (  # noqa: E402 - the harness's, from this checkout
    CpuMeter,
    StepEngine,
    calibrate_spin,
    mean_full_step_ms,
)

from decode_service.servicer import DecodeServicer  # noqa: E402
from kvtransfer.channel import CHANNEL_OPTIONS  # noqa: E402
from kvtransfer.ledger import HandoffLedger  # noqa: E402
from protos import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402
from tandem.async_engine import AsyncEngine  # noqa: E402
from tandem.records import SamplingParams  # noqa: E402
from worker import bootstrap  # noqa: E402
from worker.drain import InFlightRpcs  # noqa: E402


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
        params = SamplingParams(max_tokens=self.args.tokens, ignore_eos=True)
        num_tokens = [0]

        async def consume(i: int) -> None:
            stream = await self.engine.open_stream(f"d-{i}", [1, 2, 3], params)
            async for out in stream:
                num_tokens[0] += len(out.new_token_ids)

        meter = CpuMeter(self.engine._thread.native_id)
        await asyncio.gather(*(consume(i) for i in range(n)))
        return {**self._step_stats(n), **meter.stop(num_tokens[0])}

    async def session(self, n: int, profile: str | None = None) -> dict:
        self.fake.step_log.clear()
        cmd = [sys.executable, __file__, "--code-root", str(_code_root(sys.argv))]
        cmd += ["--client", self.address, "--streams", str(n), "--tokens", str(self.args.tokens)]
        cmd += ["--logprobs", str(self.args.logprobs)]
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
            session = await bench.session(n)
            runs[str(n)] = {
                "engine_alone": alone,
                "delivery_only": delivery,
                "session": session,
                "step_ratio_session_vs_alone": round(
                    session["mean_step_ms"] / alone["mean_step_ms"], 3
                ),
            }
            print(json.dumps({n: _brief(runs[str(n)])}), file=sys.stderr, flush=True)
        if args.profile:
            kind = "py-spy" if _have_py_spy() else "cprofile"
            runs["profile"] = await bench.session(args.streams[-1], kind)
    finally:
        await bench.stop()
    return {"spin_iters_for_host_ms": bench.spin_iters, "runs": runs}


def _brief(run: dict) -> dict:
    s, a, d = run["session"], run["engine_alone"], run["delivery_only"]
    return {
        "alone_ms": a["mean_step_ms"],
        "delivery_loop_us_tok": d["loop_us_per_token"],
        "session_ms": s["mean_step_ms"],
        "session_ratio": run["step_ratio_session_vs_alone"],
        "session_tok_s": s["tokens_per_s"],
        "session_loop_us_tok": s["loop_us_per_token"],
        "session_loop_us_msg": s["loop_us_per_message"],
        "gc_ms": s["gc_ms"],
        "gc_n": s["gc_collections_by_gen"],
    }


def _have_py_spy() -> bool:
    try:
        from control_plane import py_spy

        return py_spy() is not None
    except ImportError:
        return False


# -- the client process --------------------------------------------------------------------------
async def client_main(args) -> dict:
    """The N requests on one Session: every token checked (order, loss, duplication)."""
    channel = grpc.aio.insecure_channel(args.client, options=CHANNEL_OPTIONS)
    stub = worker_pb2_grpc.DecodeStub(channel)
    sampling = common_pb2.SamplingParams(
        max_tokens=args.tokens, ignore_eos=True, logprobs=bool(args.logprobs)
    )
    sampling.top_logprobs = args.logprobs
    await channel.channel_ready()
    print("ready", flush=True)
    num_streams = args.streams[0]
    errors: list[str] = []

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
    t0 = time.perf_counter()
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
    wall = time.perf_counter() - t0
    done.set()
    await call.code()
    await channel.close()
    for i in range(num_streams):
        rid = f"s-{i}"
        if (
            tokens.get(rid) != list(range(args.tokens))
            or finish.get(rid) != common_pb2.FINISH_REASON_LENGTH
        ):
            errors.append(f"{rid}: {len(tokens.get(rid, []))} tokens, finish {finish.get(rid)}")
    if errors:
        raise SystemExit(f"wrong streams ({len(errors)}): {errors[:3]}")
    n_tok = num_streams * args.tokens
    return {
        "wall_s": round(wall, 3),
        "tokens_per_s": round(n_tok / wall, 1),
        "messages": msgs,
        "tokens_per_message": round(n_tok / msgs, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[256, 512])
    p.add_argument("--tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--host-ms", type=float, default=3.0, help="engine step: GIL-held part")
    p.add_argument("--gpu-ms", type=float, default=12.0, help="engine step: GIL-free part")
    p.add_argument("--logprobs", type=int, default=0, help="top_logprobs per token (0: none)")
    p.add_argument("--profile", action="store_true", help="one more session run, profiled")
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
            for k in ("streams", "tokens", "host_ms", "gpu_ms", "logprobs", "loop", "gc")
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
    sys.setswitchinterval(bootstrap.GIL_SWITCH_INTERVAL_S)
    runner = bootstrap.run_event_loop
    if args.loop == "asyncio":
        runner = asyncio.run
    elif args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    return runner(serve_and_measure(args))


def _gc_setup(args) -> None:
    """Called where the worker calls it: after the engine and servicer exist."""
    if args.gc == "worker":
        bootstrap.freeze_startup_heap()
    elif args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc.startswith("threshold="):
        gc.collect()
        gc.freeze()
        gc.set_threshold(int(args.gc.split("=", 1)[1]), *gc.get_threshold()[1:])


if __name__ == "__main__":
    main()
