"""Structured outputs through the workers: real prefill and decode servicers on an in-process
grpc.aio server (127.0.0.1), real engines on a tiny random-weight Llama that uses SmolLM2's
tokenizer (so the masks do all the work).

Every path samples inside the constraint and gives the offline engine's tokens: the decode
server prefilling locally, a handoff (the prefill server masks the first token, the decode
server's matcher accepts it with the KV and masks the rest) and a migrated request (its earlier
outputs replayed into the decode server's matcher). A bad spec is INVALID_ARGUMENT naming
sampling.structured on both workers, and the wire carries every kind both ways.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import grpc
import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))  # core_helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # worker_pair

from core_helpers import save_tiny_model  # noqa: E402
from worker_pair import Session, serve_worker_pair  # noqa: E402

from protos import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402
from tandem.records import SamplingParams, StructuredOutput  # noqa: E402
from worker.convert import sampling_from_proto, sampling_to_proto  # noqa: E402

VOCAB = 49152  # SmolLM2's
PROMPT = [504, 3575, 282, 4649, 314, 28, 1848, 553, 30, 216]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        "big": {"type": "boolean"},
    },
    "required": ["city", "rank", "big"],
    "additionalProperties": False,
}
_ENGINE_FLAGS = dict(dtype="float32", device="cpu", kernel_backend="torch", block_size=4)


def _sampling(**fields) -> common_pb2.SamplingParams:
    structured = common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))
    base = dict(temperature=0.0, max_tokens=80, structured=structured)
    return common_pb2.SamplingParams(**{**base, **fields})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tandem.loader.default_model import resolve_model_dir

    path = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    save_tiny_model("llama", path, vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir(None) / name, path / name)
    return path


@pytest.fixture(scope="module")
def engines(model_dir):
    """The prefill and decode workers' engines (one grammar backend: same tokenizer) and the
    offline reference: the constrained greedy output of PROMPT."""
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine

    cfg = EngineConfig(model=str(model_dir), num_blocks=64, max_model_len=256, **_ENGINE_FLAGS)
    p_engine, d_engine = LLMEngine(cfg), LLMEngine(cfg)
    d_engine.grammars = p_engine.grammars
    req = p_engine.add_request("ref", PROMPT, sampling_from_proto(_sampling()))
    while p_engine.has_unfinished():
        p_engine.step()
    return p_engine, d_engine, req.output_token_ids


def _workers(p_core, d_core):
    return serve_worker_pair(p_core, d_core)


async def _stats(channel):
    for _ in range(100):
        stats = []
        for stub in (worker_pb2_grpc.DecodeStub(channel), worker_pb2_grpc.PrefillStub(channel)):
            stats.append(await stub.Stats(worker_pb2.StatsRequest()))
        if all(s.num_free_blocks == s.num_total_blocks for s in stats):
            break
        await asyncio.sleep(0.05)
    return stats


def test_local_handoff_and_migrated_requests_stay_inside_the_schema(engines):
    p_core, d_core, ref = engines
    k = len(ref) // 2
    bad = {
        "bad-schema": _sampling(structured=common_pb2.StructuredOutput(json_schema='{"type":1}')),
        "bad-regex": _sampling(structured=common_pb2.StructuredOutput(regex="a(")),
        "bad-kind-size": _sampling(
            structured=common_pb2.StructuredOutput(
                choice=common_pb2.ChoiceList(choices=["x"] * 1025)
            )
        ),
    }

    async def body():
        async with _workers(p_core, d_core) as channel:
            session = Session(channel)
            session.generate("local", PROMPT, _sampling())
            session.generate("migrated", PROMPT + ref[:k], _sampling(), num_output_tokens=k)
            for name, sampling in bad.items():
                session.generate(name, PROMPT, sampling)
            session.generate("handoff", PROMPT, _sampling(), local=False)
            await session.read_until(
                lambda ev: any(e.HasField("kv_target") for e in ev.get("handoff", []))
            )
            target = next(e.kv_target for e in session.events["handoff"] if e.HasField("kv_target"))
            prefill = worker_pb2_grpc.PrefillStub(channel)
            first = await prefill.Prefill(
                worker_pb2.PrefillRequest(
                    req_id="handoff",
                    prompt_token_ids=PROMPT,
                    sampling=_sampling(),
                    kv_target=target,
                ),
                timeout=60,
            )
            names = ["local", "migrated", "handoff", *bad]
            await session.read_until(lambda _: all(session.ended(n) for n in names))
            prefill_errors = []
            for name, sampling in bad.items():
                request = worker_pb2.PrefillRequest(
                    req_id=f"p-{name}", prompt_token_ids=PROMPT, sampling=sampling
                )
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await prefill.Prefill(request, timeout=30)
                prefill_errors.append((e.value.code(), e.value.details()))
            session.up.put_nowait(None)
            return session, first, prefill_errors, await _stats(channel)

    session, first, prefill_errors, stats = asyncio.run(body())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p_core.model_dir))
    jsonschema.validate(json.loads(tok.decode(ref, skip_special_tokens=True)), SCHEMA)
    assert ref[-1] in p_core.eos_token_ids  # the grammar ended it, not max_tokens
    assert session.tokens("local") == ref
    assert [first.token_id, *session.tokens("handoff")] == ref
    assert session.tokens("migrated") == ref[k:]
    for name in ("local", "migrated", "handoff"):
        assert session.events[name][-1].tokens.finish_reason == common_pb2.FINISH_REASON_STOP
    for name in bad:
        last = session.events[name][-1]
        assert last.WhichOneof("event") == "error", name
        assert last.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], name
        assert last.error.message.startswith("sampling.structured: "), last.error.message
    for code, details in prefill_errors:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("sampling.structured: "), details
    for s in stats:
        assert s.num_free_blocks == s.num_total_blocks
        assert s.num_running == s.num_waiting == 0


@pytest.mark.parametrize(
    "structured",
    [
        None,
        StructuredOutput("json", json.dumps(SCHEMA)),
        StructuredOutput("json_object"),
        StructuredOutput("regex", "[a-z]+"),
        StructuredOutput("choice", choices=("a", 'b"c', "")),
        StructuredOutput("grammar", 'root ::= "x"'),
        StructuredOutput("structural_tag", '{"type": "structural_tag"}'),
    ],
)
def test_the_wire_carries_structured_and_prompt_logprobs_both_ways(structured):
    s = SamplingParams(temperature=0.5, max_tokens=9, check=False)
    s.structured, s.prompt_logprobs = structured, 3 if structured else None
    back = sampling_from_proto(sampling_to_proto(s), check=False)
    assert back.structured == structured
    assert back.prompt_logprobs == s.prompt_logprobs
    # an empty StructuredOutput message constrains nothing
    empty = common_pb2.SamplingParams(structured=common_pb2.StructuredOutput())
    assert sampling_from_proto(empty).structured is None
