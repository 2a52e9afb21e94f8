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
