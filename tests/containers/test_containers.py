"""compose.yaml for real: the image built from the Dockerfile, compose's services in podman
containers (deploy/containers/run.sh, compose.cpu.yaml: host networking on 127.0.0.1, SmolLM2
on CPU), then scaled and broken the way an operator or a crash would:

- a chat completion through the gateway with the OpenAI client;
- `up --scale decode=2` starts a second decode server, which registers itself with the router
  and takes requests;
- `podman kill` of the decode container serving a stream: the stream migrates to the other
  decode server and ends with the same text as without the fault;
- `podman-compose stop prefill` drains the prefill server (it deregisters, finishes what it
  has, exits 0) while requests run, and none of them fails;
- `down` leaves no container, pod or volume of the project.

The tests run in this order on one stack (each needs what the one before left). The first run
on a machine builds the base image and the image (tens of minutes on 2 cores); later runs
reuse both (the image build is then a cache check).
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import openai
import pytest
from container_stack import MODEL_NAME, PROJECT, ContainerStack, engine_problem

_problem = engine_problem()
pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(_problem is not None, reason=_problem or ""),
]

COUNTING = "Count from 1 to 50, one number per line, and nothing else."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ContainerStack(tmp_path_factory.mktemp("container_logs"))
    try:
        s.start()
        yield s
    finally:
        s.save_logs()
        if s.containers() or s.pods():
            s.down()
        print(f"container stack timings (s): {s.timings}; logs in {s.log_dir}")


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


def _chat(client, prompt: str, max_tokens: int = 16, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


def test_chat_completion_through_the_gateway(stack, client):
    r = _chat(client, "What is the capital of France?")
    assert r.model == MODEL_NAME
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    # one prefill and one decode container served it, both registered by themselves
    assert len(stack.routed("prefill")) == 1
    assert len(stack.routed("decode")) == 1


def test_scale_decode_adds_a_server_that_registers_and_takes_requests(stack, client):
    (first,) = stack.containers("decode")
    stack.compose("up", "-d", "--no-deps", "--scale", "decode=2", "decode")
    decodes = stack.containers("decode")
    assert len(decodes) == 2 and decodes[0] == first, decodes
    stack.run("wait-healthy", "decode", "600", timeout=700)
    new = stack.worker_address(decodes[1])
    assert new != stack.worker_address(first)
    assert "event=worker_registered" in stack.logs(stack.containers("router")[0])
    # the router spreads load over both: concurrent requests until the new one has served some
    deadline = time.monotonic() + 180
    with cf.ThreadPoolExecutor(4) as pool:
        while stack.routed("decode").get(new, 0) == 0:
            assert time.monotonic() < deadline, (
                f"no request went to {new}: {stack.routed('decode')}"
            )
            prompts = [f"Say something about the number {i}." for i in range(4)]
            for r in pool.map(lambda p: _chat(client, p, max_tokens=8), prompts):
                assert r.choices[0].message.content is not None
    assert set(stack.routed("decode")) == {new, stack.worker_address(first)}


def _stream(client, on_chunk=None) -> tuple[str, str | None, int]:
    text, reason, n = "", None, 0
    for chunk in _chat(client, COUNTING, max_tokens=64, stream=True):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        text += c.delta.content or ""
        reason = c.finish_reason or reason
        n += 1
        if on_chunk is not None:
            on_chunk(n)
    return text, reason, n


def test_decode_container_killed_mid_stream_migrates_with_the_no_fault_text(stack, client):
    decodes = stack.containers("decode", all_states=False)
    assert len(decodes) == 2, decodes
    by_address = {stack.worker_address(c): c for c in decodes}
    clean_text, clean_reason, clean_chunks = _stream(client)
    assert clean_chunks > 20, clean_text  # long enough to be cut

    before = stack.routed("decode")
    killed: list[str] = []

    def on_chunk(n: int) -> None:
        if n == 5 and not killed:
            after = stack.routed("decode")  # counted at the first token
            (busy,) = [a for a in after if after[a] > before.get(a, 0)]
            stack.podman("kill", "--signal", "KILL", by_address[busy])
            killed.append(busy)

    text, reason, _ = _stream(client, on_chunk)
    assert killed, "the stream ended before the kill"
    assert (text, reason) == (clean_text, clean_reason)
    router_log = stack.logs(stack.containers("router")[0])
    failed = [ln for ln in router_log.splitlines() if "event=worker_failed" in ln]
    assert any(f"worker={killed[0]}" in ln and "role=decode" in ln for ln in failed), failed
    # the survivor carries on alone
    assert _chat(client, "And after the crash?").choices[0].message.content is not None


def test_prefill_container_stopped_drains_without_failing_a_request(stack, client):
    (prefill,) = stack.containers("prefill")
    long_prompt = "\n".join(f"Item {i}: the reading was {i * 37 % 101}." for i in range(40))
    prompts = [f"{long_prompt}\nRequest {i}: summarize." for i in range(6)]
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_chat, client, p, 24) for p in prompts]
        time.sleep(0.5)  # requests in flight on the prefill server
        stack.compose("stop", "-t", "45", "prefill", timeout=120)
        results = [f.result() for f in futures]  # none raises
    for r in results:
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens > 0
    running, code = stack.state(prefill)
    assert not running and code == 0, (running, code)
    log = stack.logs(prefill)
    assert "event=drain_start" in log and "event=drain_done" in log, log[-2000:]
    done = next(ln for ln in log.splitlines() if "event=drain_done" in ln)
    assert "remaining=0" in done and "deregistered=True" in done, done
    # no prefill server left: the decode servers prefill locally
    assert _chat(client, "Still there?").choices[0].message.content is not None


def test_down_leaves_nothing_running(stack):
    stack.save_logs()
    stack.down()
    assert stack.containers() == []
    assert stack.pods() == []
    volumes = stack.podman("volume", "ls", "--format", "{{.Name}}").split()
    assert [v for v in volumes if v.startswith(f"{PROJECT}_")] == []
