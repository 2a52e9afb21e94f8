"""tandem.log_config: one logfmt line format, lifecycle at INFO, per-request lines and the
libraries' chatter quiet by default."""

import asyncio
import io
import logging
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from tandem.log_config import QUIET_LOGGERS, configure_logging, event, quote

# the in-process router's fakes live with the router tests (not a package: put them on the path)
sys.path.insert(0, str(Path(__file__).resolve().parent / "router"))

from router_fakes import start_stack, write_model_dir  # noqa: E402

from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import make_server  # noqa: E402
from protos import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(60)

LINE = re.compile(
    r"^ts=(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) level=(?P<level>[a-z]+) "
    r"logger=(?P<logger>\S+) (?P<rest>.*)$"
)
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def pairs(text: str) -> dict[str, str]:
    """A logfmt line's key=value pairs, quoted values unescaped."""
    out = {}
    for key, value in PAIR.findall(text):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), value[1:-1])
        out[key] = value
    return out


@pytest.fixture
def log_stream():
    """configure_logging into a buffer; the root logger and the quiet loggers put back after."""
    root = logging.getLogger()
    saved = (
        root.level,
        list(root.handlers),
        {n: logging.getLogger(n).level for n in QUIET_LOGGERS},
    )
    buf = io.StringIO()
    yield buf
    for handler in list(root.handlers):
        if handler not in saved[1]:
            root.removeHandler(handler)
    root.setLevel(saved[0])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def test_a_line_is_ts_level_logger_then_the_event(log_stream):
    configure_logging("info", stream=log_stream)
    logging.getLogger("tandem.router").info(
        event("router_ready", address="127.0.0.1:1", detail='no "workers" yet')
    )
    logging.getLogger("somelib").warning("a plain message = not ours")
    first, second = log_stream.getvalue().splitlines()
    m = LINE.match(first)
    assert m, first
    assert (m["level"], m["logger"]) == ("info", "tandem.router")
    assert pairs(m["rest"]) == {
        "event": "router_ready",
        "address": "127.0.0.1:1",
        "detail": 'no "workers" yet',
    }
    # another library's message is kept whole, as one quoted value
    m = LINE.match(second)
    assert m and m["level"] == "warning" and m["logger"] == "somelib"
    assert pairs(m["rest"]) == {"msg": "a plain message = not ours"}


def test_configuring_twice_does_not_double_lines(log_stream):
    configure_logging("info", stream=log_stream)
    configure_logging("info", stream=log_stream)
    logging.getLogger("tandem.x").info("event=once")
    assert log_stream.getvalue().count("event=once") == 1


def test_tracebacks_follow_their_event(log_stream):
    configure_logging("info", stream=log_stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("tandem.x").exception("event=step_failed")
    lines = log_stream.getvalue().splitlines()
    assert LINE.match(lines[0])["rest"] == "event=step_failed"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_quote_leaves_single_tokens_bare():
    assert quote("127.0.0.1:50100") == "127.0.0.1:50100"
    assert quote("") == '""'
    for value in ("a\\b c", "two\nlines", 'say "hi"'):
        assert pairs("k=" + quote(value)) == {"k": value}


def test_third_party_loggers_are_quiet_unless_debug(log_stream):
    configure_logging("info", stream=log_stream)
    for name in ("uvicorn.access", "uvicorn.error", "grpc", "httpx"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET /health" 200')
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://127.0.0.1:8000")
    assert log_stream.getvalue() == ""
    assert logging.getLogger("tandem.gateway").isEnabledFor(logging.INFO)
    configure_logging("debug", stream=log_stream)  # asked for everything: the libraries too
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG


def test_an_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match="debug, info, warning, error, critical"):
        configure_logging("loud")


def test_router_start_and_requests_log_at_info_and_nothing_at_warning(tmp_path, log_stream):
    configure_logging("info", stream=log_stream)
    model_dir = write_model_dir(tmp_path / "tiny_model")

    async def scenario():
        stack = await start_stack(model_dir, [5, 6, 7, 8])
        started = len(log_stream.getvalue().splitlines())
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                for _ in range(3):
                    request = router_pb2.GenerateRequest(
                        text="hello",
                        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=3),
                    )
                    chunks = [c async for c in stub.Generate(request)]
                    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            served = len(log_stream.getvalue().splitlines())
        finally:
            await stack.stop()
        return started, served

    started, served = asyncio.run(scenario())
    lines = log_stream.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    events = [(m["level"], m["logger"], pairs(m["rest"]).get("event")) for m in parsed]
    assert ("info", "tandem.router", "router_ready") in events, lines
    assert not [e for e in events if e[0] not in ("debug", "info")], lines
    # requests are served without a line each at the default level
    assert lines[started:served] == [], lines[started:served]


def test_the_gateway_says_it_listens_and_uvicorn_adds_nothing(log_stream):
    configure_logging("info", stream=log_stream)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(GatewayConfig(router="127.0.0.1:1"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        started = len(log_stream.getvalue().splitlines())
        for _ in range(3):  # no access-log line per request at info
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-page", timeout=5)
        served = log_stream.getvalue().splitlines()[started:]
    finally:
        server.should_exit = True
        thread.join(10)
    lines = log_stream.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    listening = [pairs(m["rest"]) for m in parsed if "event=gateway_listening" in m["rest"]]
    assert listening == [{"event": "gateway_listening", "address": f"http://127.0.0.1:{port}"}]
    assert not [m for m in parsed if m["logger"].startswith("uvicorn")], lines
    assert served == []
