"""Playing the attacker against a running stack (tests/security/attacks.py): a stranger on the
network reaches nothing behind the gateway, a holder of the wrong role's certificate is refused
per RPC, the router's gRPC API demands the gateway's API key, a fake worker cannot join,
fields a worker would choke on are refused at its boundary, public answers carry no paths or
internal addresses; and after all of it the stack answers exactly as before, with every KV
block free.

Targets: `tandem serve` with its defaults, and the compose layout run as processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks as atk  # noqa: E402

from protos import common_pb2, worker_pb2  # noqa: E402
from rpc.procs import free_port, wait_grpc_healthy  # noqa: E402
from rpc.tls import PLAINTEXT  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "sk-security-test"
PROMPTS = ["The capital of France is", "Write one word about the sea:", "1, 2, 3,"]
DENIED, UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _serve_target(tmp):
    from serve_stack import ServeStack

    stack = ServeStack(tmp, API_KEY)
    return stack.target, stack.stop


def _compose_target(tmp):
    compose = pytest.importorskip("compose_processes")
    return compose.start_target(tmp, API_KEY)


@pytest.fixture(scope="module", params=["serve", "compose"])
def target(request, tmp_path_factory):
    make = _serve_target if request.param == "serve" else _compose_target
    t, stop = make(tmp_path_factory.mktemp(f"sec-{request.param}"))
    t.extra["baseline"] = _outputs(t)
    yield t
    stop()


def _client(t) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.base_url, api_key=t.api_key, max_retries=0, timeout=120)


def _outputs(t) -> list[str]:
    client = _client(t)
    return [
        client.completions.create(model=t.model, prompt=p, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]


def test_a_stranger_reaches_nothing_behind_the_gateway(target, tmp_path):
    strangers = atk.stranger_credentials(tmp_path / "stranger")
    for name, tls in strangers.items():
        for address in [target.router, *target.prefill, *target.decode]:
            assert atk.health(address, tls) == UNAVAILABLE, (name, address)
            assert atk.reflection(address, tls) == UNAVAILABLE, (name, address)
        code, _ = atk.generate(target.router, tls)
        assert code == UNAVAILABLE, name
        role = worker_pb2.WORKER_ROLE_DECODE
        assert atk.register(target.router, tls, role, "127.0.0.1:1") == UNAVAILABLE, name
        assert atk.deregister_guesses(target.router, tls) == {UNAVAILABLE}, name
        assert atk.kv_push(target.decode[0], tls)[0] == UNAVAILABLE, name


def test_each_role_is_refused_what_it_does_not_need(target):
    client, prefill_cert = target.tls("client"), target.tls("prefill")
    gateway = target.tls("gateway")
    decode_role = worker_pb2.WORKER_ROLE_DECODE
    # an API user (client certificate) cannot join or drain pools, or talk to workers
    assert atk.register(target.router, client, decode_role, "127.0.0.1:1") == DENIED
    assert atk.deregister_guesses(target.router, client) == {DENIED}
    req = worker_pb2.DecodeRequest(
        req_id="x-0", prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4), prefill_locally=True,
    )  # fmt: skip
    assert atk.decode_session(target.decode[0], client, req)[0] == DENIED
    if target.prefill:
        preq = worker_pb2.PrefillRequest(req_id="x-1", prompt_token_ids=[1, 2, 3])
        assert atk.prefill(target.prefill[0], client, preq) == DENIED
        assert atk.prefill(target.prefill[0], gateway, preq) == DENIED
    assert atk.kv_push(target.decode[0], client)[0] == DENIED
    assert atk.kv_push(target.decode[0], gateway)[0] == DENIED
    # a prefill server's certificate opens KV pushes and registration only: not the decode
    # server's request stream, not the public API
    assert atk.decode_session(target.decode[0], prefill_cert, req)[0] == DENIED
    assert atk.generate(target.router, prefill_cert, target.api_key)[0] == DENIED
    # ... and it cannot register as a decode server
    assert (
        atk.register(target.router, prefill_cert, decode_role, "127.0.0.1:1") != grpc.StatusCode.OK
    )


def test_the_router_api_demands_the_api_key(target):
    client = target.tls("client")
    assert atk.generate(target.router, client)[0] == UNAUTH
    assert atk.generate(target.router, client, "sk-guess")[0] == UNAUTH
    assert atk.list_models(target.router, client)[0] == UNAUTH
    code, chunks = atk.generate(target.router, client, target.api_key)
    assert code == grpc.StatusCode.OK and chunks
    # public answers name no internal address or path
    for c in chunks:
        if c.HasField("timing"):
            assert not c.timing.prefill_worker and not c.timing.decode_worker
    code, models = atk.list_models(target.router, client, target.api_key)
    assert code == grpc.StatusCode.OK
    assert all("/" not in m.root for m in models[0].models)
    listed = httpx.get(
        f"{target.base_url}/models", headers={"Authorization": f"Bearer {target.api_key}"}
    ).json()
    assert all("/" not in str(m.get("root", "")) for m in listed["data"])


def test_a_fake_worker_cannot_join(target, tmp_path):
    """A stranger's decode server (it would answer every user with its own text) tries to
    register with every credential it can get; users keep the real model's answers."""
    port = free_port("127.0.0.1")
    fake = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_worker", "--role", "decode", "--port", str(port)]
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_grpc_healthy(address, fake, 60, PLAINTEXT)
        creds = [*atk.stranger_credentials(tmp_path / "s").values(), target.tls("client")]
        for tls in creds:
            code = atk.register(target.router, tls, worker_pb2.WORKER_ROLE_DECODE, address, address)
            assert code in (UNAVAILABLE, DENIED)
        assert _outputs(target) == target.extra["baseline"]
    finally:
        fake.terminate()
        fake.wait(timeout=30)


def test_workers_refuse_fields_they_would_choke_on(target):
    """Straight to the workers with the router's own certificate (a router bug, or a stolen
    router key): refused at the worker's boundary, and the worker keeps serving."""
    router = target.tls("router")
    bad = [
        common_pb2.SamplingParams(temperature=0.0, max_tokens=4, stop_token_ids=[10**7]),
        common_pb2.SamplingParams(temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=10**6),
    ]
    for i, s in enumerate(bad):
        req = worker_pb2.DecodeRequest(
            req_id=f"bad-{i}", prompt_token_ids=[1, 2, 3], sampling=s, prefill_locally=True
        )
        code, events = atk.decode_session(target.decode[0], router, req)
        refused = code == grpc.StatusCode.INVALID_ARGUMENT or (
            events and events[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        )
        assert refused, (s, code, events)
        if target.prefill:
            preq = worker_pb2.PrefillRequest(
                req_id=f"badp-{i}", prompt_token_ids=[1, 2, 3], sampling=s
            )
            assert atk.prefill(target.prefill[0], router, preq) == grpc.StatusCode.INVALID_ARGUMENT
    for address in [*target.decode, *target.prefill]:
        assert atk.serving(address, router)


def test_kv_goes_nowhere_a_caller_points(target, tmp_path):
    """Prefill requests (with the router's own certificate) that aim the KV at an attacker's
    server, or at a file of the attacker's choosing: refused, nothing sent, nothing written."""
    if not target.prefill:
        pytest.skip("no prefill server in this layout")
    router = target.tls("router")
    trap = atk.KVTrap(tmp_path / "trap-ca")
    bait = tmp_path / "bait"
    bait.write_bytes(b"")
    try:
        prompt = list(range(1, 70))
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)
        cases = [
            atk.kv_target(trap.address),  # no capability
            atk.kv_target(
                trap.address, b"\x01" * 32
            ),  # a made-up one: the trap is no decode server of ours
            atk.kv_target(trap.address, b"\x01" * 32, shm_path=str(bait)),
            atk.kv_target("unix:/tmp/evil.sock", b"\x01" * 32),
        ]
        for i, t in enumerate(cases):
            req = worker_pb2.PrefillRequest(
                req_id=f"evil-{i}", prompt_token_ids=prompt, sampling=sampling, kv_target=t
            )
            assert atk.prefill(target.prefill[0], router, req) != grpc.StatusCode.OK, t
        assert trap.messages == []  # not one KV byte reached the attacker's server
        assert bait.stat().st_size == 0  # the file was neither grown nor filled
    finally:
        trap.close()
    assert atk.serving(target.prefill[0], router)


def test_a_kv_push_needs_the_handoffs_capability(target):
    """A prefill server's certificate (stolen, or a compromised prefill server) is not enough to
    write into a decode server's KV: the push is stopped before a byte is stored."""
    code, replies = atk.kv_push(target.decode[0], target.tls("prefill"))
    assert code == grpc.StatusCode.OK or code == grpc.StatusCode.CANCELLED, code
    assert replies and replies[0].reply == worker_pb2.KV_REPLY_STOP
    assert "capability" in replies[0].error or "handoff" in replies[0].error


def test_model_names_get_a_clear_error_not_overloaded(target):
    client = _client(target)
    for model, status in (("x" * 100_000, 400), ("", 400), ("no-such-model", 404)):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert e.value.status_code == status, (len(model), e.value.status_code)


def test_after_every_attack_the_stack_answers_as_before(target):
    assert _outputs(target) == target.extra["baseline"]
    router = target.tls("router")
    deadline = time.monotonic() + 30
    while True:  # blocks return once the last streams have ended
        stats = [atk.worker_stats(a, router, "decode") for a in target.decode]
        if all(s.num_free_blocks == s.num_total_blocks for s in stats):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)
