"""Workers check every request at their own boundary, whoever calls them, and a broken engine
takes its worker out of service.

Decode.Session and Prefill.Prefill called directly (not through the router) with each bad
field get INVALID_ARGUMENT naming that field; the same workers then serve a normal request,
a remote-prefill handoff, correctly, with every block free afterwards. A worker whose engine
cannot go on reports NOT_SERVING and exits non-zero (a subprocess).

Run as a script, this module is `tandem decode` with a broken engine (test-only fault
injection: every forward fails with a device error):
    python tests/services/test_worker_validation.py --broken-engine <tandem decode args>
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # core_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # worker_pair

from core_helpers import save_tiny_model  # noqa: E402
from worker_pair import HOST, Session, serve_worker_pair  # noqa: E402

from protos import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402
from worker.bootstrap import EXIT_ENGINE_DEAD  # noqa: E402

VOCAB = 256  # the tiny model's (core_helpers.BASE)
MAX_MODEL_LEN = 128
PROMPT = [3, 17, 42, 99, 7, 11, 250, 8, 64, 5, 31]
NUM_OUT = 12
_ENGINE_FLAGS = dict(dtype="float32", device="cpu", kernel_backend="torch", block_size=4)

# (name, prompt, sampling fields, top-level fields, the field the message must name)
BAD = [
    ("stop-id-past-vocab", PROMPT, dict(stop_token_ids=[VOCAB]), {}, "sampling.stop_token_ids"),
    ("stop-id-negative", PROMPT, dict(stop_token_ids=[-1]), {}, "sampling.stop_token_ids"),
    ("huge-top-logprobs", PROMPT, dict(logprobs=True, top_logprobs=10**6), {},
     "sampling.top_logprobs"),
    ("top-logprobs-without-logprobs", PROMPT, dict(top_logprobs=21), {}, "sampling.top_logprobs"),
    ("logit-bias-key-past-vocab", PROMPT, dict(logit_bias={VOCAB + 5: 1.0}), {},
     "sampling.logit_bias"),
    ("logit-bias-nan", PROMPT, dict(logit_bias={5: math.nan}), {}, "sampling.logit_bias"),
    ("too-many-logit-bias", PROMPT, dict(logit_bias={i: 1.0 for i in range(1025)}), {},
     "sampling.logit_bias"),
    ("too-many-stop-ids", PROMPT, dict(stop_token_ids=[5] * 1025), {}, "sampling.stop_token_ids"),
    ("prompt-id-past-vocab", [*PROMPT, VOCAB], {}, {}, "prompt_token_ids"),
    ("prompt-id-negative", [*PROMPT, -4], {}, {}, "prompt_token_ids"),
    ("empty-prompt", [], {}, {}, "prompt_token_ids"),
    ("max-tokens-zero", PROMPT, dict(max_tokens=0), {}, "sampling.max_tokens"),
    ("max-tokens-negative", PROMPT, dict(max_tokens=-3), {}, "sampling.max_tokens"),
    ("max-tokens-past-context", PROMPT, dict(max_tokens=MAX_MODEL_LEN), {}, "sampling.max_tokens"),
    ("prompt-fills-context", [5] * MAX_MODEL_LEN, {}, {}, "prompt_token_ids"),
    ("num-output-tokens-whole-prompt", PROMPT, {}, dict(num_output_tokens=len(PROMPT)),
     "num_output_tokens"),
    ("temperature-nan", PROMPT, dict(temperature=math.nan), {}, "sampling.temperature"),
    ("temperature-inf", PROMPT, dict(temperature=math.inf), {}, "sampling.temperature"),
    ("temperature-negative", PROMPT, dict(temperature=-1.0), {}, "sampling.temperature"),
    ("top-k-below-minus-one", PROMPT, dict(top_k=-2), {}, "sampling.top_k"),
    ("top-p-zero", PROMPT, dict(top_p=0.0), {}, "sampling.top_p"),
    ("top-p-nan", PROMPT, dict(top_p=math.nan), {}, "sampling.top_p"),
    ("min-p-above-one", PROMPT, dict(min_p=1.5), {}, "sampling.min_p"),
    ("presence-penalty", PROMPT, dict(presence_penalty=3.0), {}, "sampling.presence_penalty"),
    ("frequency-penalty-nan", PROMPT, dict(frequency_penalty=math.nan), {},
     "sampling.frequency_penalty"),
    ("repetition-penalty", PROMPT, dict(repetition_penalty=0.0), {}, "sampling.repetition_penalty"),
    ("min-tokens-over-max", PROMPT, dict(min_tokens=9, max_tokens=4), {}, "sampling.min_tokens"),
    ("min-tokens-negative", PROMPT, dict(min_tokens=-1), {}, "sampling.min_tokens"),
]  # fmt: skip


def _sampling(**fields) -> common_pb2.SamplingParams:
    base = dict(temperature=0.0, max_tokens=NUM_OUT, ignore_eos=True)
    return common_pb2.SamplingParams(**{**base, **fields})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir) -> list[int]:
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine
    from tandem.records import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=64, **_ENGINE_FLAGS))
    req = engine.add_request(
        "ref", PROMPT, SamplingParams(temperature=0, max_tokens=NUM_OUT, ignore_eos=True)
    )
    while engine.has_unfinished():
        engine.step()
    return req.output_token_ids


@contextlib.asynccontextmanager
async def _workers(model_dir):
    """A prefill and a decode servicer on one in-process server (real engines, 127.0.0.1)."""
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine

    cfg = EngineConfig(
        model=str(model_dir), num_blocks=64, max_model_len=MAX_MODEL_LEN, **_ENGINE_FLAGS
    )
    async with serve_worker_pair(LLMEngine(cfg), LLMEngine(cfg)) as channel:
        yield channel


async def _all_free(channel) -> tuple[worker_pb2.WorkerStats, worker_pb2.WorkerStats]:
    """Both workers' stats once nothing runs (a finished handoff frees blocks just after)."""
    for _ in range(100):
        stats = []
        for stub in (worker_pb2_grpc.DecodeStub(channel), worker_pb2_grpc.PrefillStub(channel)):
            stats.append(await stub.Stats(worker_pb2.StatsRequest()))
        if all(s.num_free_blocks == s.num_total_blocks for s in stats):
            break
        await asyncio.sleep(0.05)
    return stats[0], stats[1]


def test_bad_fields_are_refused_by_name_and_the_workers_go_on(model_dir, reference):
    async def body():
        async with _workers(model_dir) as channel:
            session = Session(channel)
            for name, prompt, fields, top, _ in BAD:
                session.generate(name, prompt, _sampling(**fields), **top)
            await session.read_until(lambda _: all(session.ended(b[0]) for b in BAD))
            prefill = worker_pb2_grpc.PrefillStub(channel)
            prefill_errors = {}
            for name, prompt, fields, top, _ in BAD:
                request = worker_pb2.PrefillRequest(
                    req_id=f"p-{name}", prompt_token_ids=prompt, sampling=_sampling(**fields), **top
                )
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await prefill.Prefill(request, timeout=30)
                prefill_errors[name] = (e.value.code(), e.value.details())
            # then a normal request through both workers: remote prefill, KV handed over
            session.generate("good", PROMPT, _sampling(), local=False)
            await session.read_until(
                lambda ev: any(e.HasField("kv_target") for e in ev.get("good", []))
            )
            target = next(e.kv_target for e in session.events["good"] if e.HasField("kv_target"))
            first = await prefill.Prefill(
                worker_pb2.PrefillRequest(
                    req_id="good", prompt_token_ids=PROMPT, sampling=_sampling(), kv_target=target
                ),
                timeout=30,
            )
            await session.read_until(lambda _: session.ended("good"))
            session.up.put_nowait(None)
            return session, prefill_errors, first, await _all_free(channel)

    session, prefill_errors, first, (decode_stats, prefill_stats) = asyncio.run(body())
    for name, _, _, _, field in BAD:
        last = session.events[name][-1]
        assert last.WhichOneof("event") == "error", name
        assert last.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], name
        assert last.error.message.startswith(f"{field}: "), (name, last.error.message)
        code, details = prefill_errors[name]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert details.startswith(f"{field}: "), (name, details)
    assert [first.token_id, *session.tokens("good")] == reference
    assert session.events["good"][-1].tokens.finish_reason == common_pb2.FINISH_REASON_LENGTH
    for stats in (decode_stats, prefill_stats):
        assert stats.num_free_blocks == stats.num_total_blocks
        assert stats.num_running == stats.num_waiting == 0


def test_a_worker_whose_engine_cannot_go_on_reports_not_serving_and_exits(model_dir):
    from rpc.procs import free_port

    port = free_port(HOST)
    cmd = [sys.executable, __file__, "--broken-engine", "--host", HOST, "--port", str(port)]
    cmd += ["--model", str(model_dir), "--num-blocks", "64"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in _ENGINE_FLAGS.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        statuses, error = asyncio.run(_break_it(f"{HOST}:{port}", proc))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_ENGINE_DEAD, out
    assert error.code == grpc.StatusCode.INTERNAL.value[0], error
    assert "engine failed" in error.message
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, (statuses, out)
    assert "event=engine_dead" in out


async def _break_it(addr: str, proc: subprocess.Popen):
    """Wait for SERVING, send one request (its step fails with a device error), then watch
    the health service until the server goes away."""
    channel = grpc.aio.insecure_channel(addr)
    health = health_pb2_grpc.HealthStub(channel)
    service = "tandem.v1.Decode"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        try:
            r = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.3)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service))
    statuses = [(await asyncio.wait_for(watch.read(), 10)).status]
    session = Session(channel)
    session.generate("doomed", PROMPT, _sampling())
    await session.read_until(lambda _: session.ended("doomed"))
    error = session.events["doomed"][-1].error
    with contextlib.suppress(grpc.aio.AioRpcError):
        while (msg := await asyncio.wait_for(watch.read(), 30)) is not grpc.aio.EOF:
            statuses.append(msg.status)
    await channel.close()
    return statuses, error


def _run_broken_decode(argv: list[str]) -> None:
    """`tandem decode` whose every forward fails with a device error (fatal at once)."""
    from decode_service.server import main as decode_main
    from tandem.runner import ModelRunner

    def broken_launch(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    ModelRunner.launch = broken_launch
    decode_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--broken-engine"]:
        raise SystemExit(__doc__)
    _run_broken_decode(sys.argv[2:])
