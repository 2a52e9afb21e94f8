"""`tandem serve` takes `vllm serve`'s flag names, says its version without loading torch, and
refuses a taken port before it loads or starts anything. No model is loaded here."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import pytest

from tandem import __version__
from tandem_cli.serve_flags import WORKER_DEFAULTS, add_serve_args, check_serve_args
from tandem_cli.startup import bind_error

# `vllm serve` flags that mean the same thing on `tandem serve`, each with a value to try
VLLM_FLAGS = {
    "--model": "MODEL_DIR",
    "--served-model-name": "my-model",
    "--host": "127.0.0.1",
    "--port": "8123",
    "--api-key": "k",
    "--tensor-parallel-size": "1",
    "-tp": "1",
    "--dtype": "bfloat16",
    "--device": "cpu",
    "--load-format": "safetensors",
    "--seed": "7",
    "--max-model-len": "1024",
    "--block-size": "16",
    "--gpu-memory-utilization": "0.5",
    "--num-gpu-blocks-override": "64",
    "--max-num-seqs": "8",
    "--max-num-batched-tokens": "512",
    "--max-logprobs": "5",
    "--stream-interval": "2",
    "--tool-call-parser": "hermes",
    "--reasoning-parser": "qwen3",
    "--api-server-count": "2",
    "--enable-prefix-caching": None,
    "--no-enable-prefix-caching": None,
    "--enforce-eager": None,
    "--async-scheduling": None,
    "--no-async-scheduling": None,
    "--disable-log-requests": None,
    "--disable-log-stats": None,
    "--version": None,
}


class _Refuse(argparse.ArgumentParser):
    def error(self, message):
        raise AssertionError(message)


def _serve_parser(cls=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = cls(prog="tandem serve")
    add_serve_args(p)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    p = _serve_parser(_Refuse)
    args = p.parse_args(argv)
    check_serve_args(args, p)
    return args


def test_every_vllm_flag_name_is_a_serve_flag():
    options = {s for a in _serve_parser()._actions for s in a.option_strings}
    assert set(VLLM_FLAGS) - options == set()
    for flag, value in VLLM_FLAGS.items():
        if flag != "--version":
            _parse([flag] if value is None else [flag, value])  # each parses on its own


def test_a_vllm_command_line_parses_to_the_same_settings():
    args = _parse(
        ["-tp", "1", "--model", "MODEL_DIR", "--enable-prefix-caching", "--enforce-eager"]
        + ["--max-logprobs", "5", "--dtype", "half", "--num-gpu-blocks-override", "64"]
        + ["--api-server-count", "2", "--disable-log-requests", "--disable-log-stats"]
    )
    assert (args.tensor_parallel_size, args.model, args.enable_prefix_caching) == (
        1,
        "MODEL_DIR",
        True,
    )
    assert args.enforce_eager and args.max_logprobs == 5 and args.dtype == "half"
    assert args.num_blocks == 64 and args.gateways == 2
    assert not _parse(["--no-enable-prefix-caching"]).enable_prefix_caching
    assert _parse([]).enable_prefix_caching and _parse([]).max_logprobs == 20


def test_model_as_positional_or_flag():
    assert _parse(["DIR"]).model == "DIR" and _parse(["--model", "DIR"]).model == "DIR"
    assert _parse(["DIR", "--model", "DIR"]).model == "DIR"
    assert _parse([]).model is None
    with pytest.raises(AssertionError, match="differ"):
        _parse(["A", "--model", "B"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "fp8"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--load-format", "pt"], "invalid choice"),
        (["--kernel-backend", "cutlass"], "invalid choice"),
        (["--port", "70000"], "0..65535"),
        (["--port", "0"], "--port must be a fixed port"),
        (["--gateways", "0"], "--gateways and --routers"),
        (["--max-logprobs", "-1"], "--max-logprobs"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(argv, message):
    with pytest.raises(AssertionError, match=message):
        _parse(argv)


def _worker_parser() -> argparse.ArgumentParser:
    from decode_service.server import add_cli_args  # the engine's flags: loads torch

    p = _Refuse(prog="tandem decode")
    add_cli_args(p)
    return p


def test_serve_choices_and_defaults_are_the_workers_and_every_flag_it_passes_parses():
    from tandem_cli.serve import _engine_argv

    serve_actions = {a.dest: a for a in _serve_parser()._actions}
    worker = _worker_parser()
    worker_actions = {a.dest: a for a in worker._actions}
    for dest in ("dtype", "device", "load_format", "kernel_backend", "log_level"):
        assert list(serve_actions[dest].choices) == list(worker_actions[dest].choices), dest
    assert set(serve_actions["kv_transport"].choices) == set(worker_actions["kv_transport"].choices)
    for dest, value in WORKER_DEFAULTS.items():
        assert worker_actions[dest].default == value, dest
    assert worker_actions["max_logprobs"].default == serve_actions["max_logprobs"].default
    args = _parse(
        ["-tp", "1", "--dtype", "float32", "--device", "cpu", "--kernel-backend", "torch"]
        + ["--num-blocks", "64", "--no-enable-prefix-caching", "--enforce-eager"]
        + ["--max-logprobs", "7", "--no-async-scheduling", "--seed", "3"]
    )
    got = worker.parse_args(_engine_argv(args))
    assert (got.dtype, got.device, got.kernel_backend, got.num_blocks) == (
        "float32",
        "cpu",
        "torch",
        64,
    )
    assert not got.enable_prefix_caching and got.enforce_eager and got.max_logprobs == 7
    assert got.async_scheduling is False and got.seed == 3 and got.tensor_parallel_size == 1


def test_serve_hands_the_router_its_tool_and_reasoning_flags():
    from router.server import add_cli_args
    from tandem_cli.serve import _tool_argv

    router = _Refuse(prog="tandem router")
    add_cli_args(router)
    serve_actions = {a.dest: a for a in _serve_parser()._actions}
    router_actions = {a.dest: a for a in router._actions}
    for dest in ("tool_call_parser", "reasoning_parser"):
        assert list(serve_actions[dest].choices) == list(router_actions[dest].choices), dest
    args = _parse(
        ["--tool-call-parser", "llama3_json", "--enable-auto-tool-choice"]
        + ["--reasoning-parser", "deepseek_r1"]
    )
    got = router.parse_args(["--model", "M", *_tool_argv(args)])
    assert (got.tool_call_parser, got.enable_auto_tool_choice, got.reasoning_parser) == (
        "llama3_json",
        True,
        "deepseek_r1",
    )
    assert _tool_argv(_parse([])) == []
    with pytest.raises(AssertionError, match="--enable-auto-tool-choice requires"):
        _parse(["--enable-auto-tool-choice"])


def _parsers():
    from gateway.server import add_cli_args as gateway
    from router.server import add_cli_args as router
    from worker.flags import add_engine_args

    out = {"serve": _serve_parser()}
    for name, add in (("router", router), ("gateway", gateway)):
        out[name] = argparse.ArgumentParser()
        add(out[name])
    out["decode"] = _worker_parser()
    from prefill_service.server import add_cli_args as prefill

    out["prefill"] = argparse.ArgumentParser()
    prefill(out["prefill"])
    out["engine"] = argparse.ArgumentParser()
    add_engine_args(out["engine"], default_port=0)
    return out


def test_every_flag_has_help():
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in _parsers().items()
        for a in p._actions
        if not a.help
    ]
    assert missing == []


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version_prints_and_exits_0_without_torch(argv):
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tandem_cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"tandem {__version__}"
    # -X importtime: one line per module imported, "... | cumulative | <indent>name"
    modules = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "tandem" in modules and "torch" not in modules
    assert time.monotonic() - t0 < 20


def _listening(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_a_listening_port_is_busy_and_a_time_wait_one_is_not():
    with _listening() as held:
        port = held.getsockname()[1]
        error = bind_error("127.0.0.1", port)
        assert error and f"port {port} on 127.0.0.1 is in use" in error
        assert "another process holds it" in error
        assert bind_error("0.0.0.0", port)  # the wildcard overlaps the held address
    # a connection the server side closes first leaves 127.0.0.1:port in TIME_WAIT
    srv = _listening()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn, _ = srv.accept()
    srv.close()
    conn.close()
    assert cli.recv(1) == b""  # the server's FIN arrived
    cli.close()
    if sys.platform.startswith("linux"):
        with socket.socket() as plain, pytest.raises(OSError):  # proof of TIME_WAIT
            plain.bind(("127.0.0.1", port))
    assert bind_error("127.0.0.1", port) is None


@pytest.mark.parametrize("flag", ["--port", "--router-port"])
def test_serve_refuses_a_busy_port_before_loading_or_starting_anything(flag, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "TANDEM_CACHE": str(cache)}
    with _listening() as held:
        port = held.getsockname()[1]
        argv = [flag, str(port)] if flag == "--port" else ["--port", "1", flag, str(port)]
        if flag == "--router-port":
            with _listening() as free:  # a --port that is surely free: one just closed
                argv[1] = str(free.getsockname()[1])
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "tandem_cli.main", "serve", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        took = time.monotonic() - t0
    assert out.returncode != 0
    assert f"{flag} {port}" in out.stderr and f"port {port}" in out.stderr
    assert "another process holds it" in out.stderr
    assert took < 10, took
    assert "child_started" not in out.stdout  # nothing was started
    assert list(cache.iterdir()) == []  # nor the model prepared
