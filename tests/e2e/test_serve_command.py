"""The README's first command: `tandem serve` brings the whole stack up and Ctrl-C takes it down."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_tandem_serve_starts_answers_and_stops_cleanly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), "--num-blocks", "256"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, (
                "tandem serve did not come up"
            )
            line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == ["SmolLM2-135M-Instruct"]
        resp = client.chat.completions.create(
            model=models[0],
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=8,
            temperature=0,
        )
        assert resp.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_serve_with_stream_interval_and_async_scheduling_streams_the_same_text():
    """`tandem serve --stream-interval 3 --async-scheduling` (async forced on, here on CPU):
    streamed completions arrive 3 tokens a chunk (the first alone) and read the same as the
    non-streamed answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), "--num-blocks", "256"]
    cmd += ["--stream-interval", "3", "--async-scheduling"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not come up"
            line = proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        kw = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", temperature=0)
        kw["max_tokens"] = 10
        kw["extra_body"] = {"ignore_eos": True}
        whole = client.completions.create(**kw)
        chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
        texts = [c.choices[0].text for c in chunks]
        assert "".join(texts) == whole.choices[0].text
        assert whole.usage.completion_tokens == 10
        # 10 tokens: 1, then 3, 3, 3 (the last with the finish); never one chunk per token
        assert 3 <= len([t for t in texts if t]) <= 5
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
