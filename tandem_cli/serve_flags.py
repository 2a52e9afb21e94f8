"""The flags of `tandem serve`, named like `vllm serve`'s where they mean the same thing.

Torch-free (nothing here loads the engine): `tandem serve --help` and `--version` answer at
once. The closed sets (dtype, device, load format, kernel backend) are spelled out here and
tests/e2e/test_serve_flags.py checks that they equal the workers' (worker/flags.py).
"""

from __future__ import annotations

import argparse
import os

from rpc.tls import add_tls_args
from tandem import __version__
from tandem.log_config import DEFAULT_LEVEL, LEVELS

API_KEY_ENV = "TANDEM_API_KEY"
VERSION = f"tandem {__version__}"

DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]  # vLLM's --dtype choices
DEVICES = ["auto", "cuda", "cpu"]
LOAD_FORMATS = ["auto", "safetensors", "gguf", "dummy"]
KERNEL_BACKENDS = ["auto", "torch", "triton"]
KV_TRANSPORTS = ["auto", "grpc", "shm", "cuda_ipc"]  # kvtransfer.select.CHOICES
# the router's (router/tool_parsers.py TOOL_PARSERS, router/reasoning.py REASONING_PARSERS)
TOOL_CALL_PARSERS = ["hermes", "llama3_json", "mistral"]
REASONING_PARSERS = ["qwen3", "deepseek_r1"]

# The workers' own defaults (worker/flags.py; a test keeps the two equal), for help and banner.
WORKER_DEFAULTS = {
    "block_size": 16,
    "max_num_seqs": 256,
    "max_num_batched_tokens": 2048,
    "seed": 0,
    "tensor_parallel_size": 1,
}
# (flag, type, choices, help): handed to every prefill and decode server as given; None (not
# given) leaves the worker's own default, which the help names.
ENGINE_FLAGS = [
    ("dtype", str, DTYPES, "weights and activations (auto: bfloat16 on CUDA, float32 on CPU)"),
    ("device", str, DEVICES, "where the workers run (auto: cuda when a GPU is visible)"),
    ("load_format", str, LOAD_FORMATS, "weights format (auto: from the files; dummy: random)"),
    ("kernel_backend", str, KERNEL_BACKENDS, "kernels (auto: triton on CUDA, torch on CPU)"),
    ("block_size", int, None, "tokens per KV block (default %d)"),
    ("num_blocks", int, None, "KV blocks per worker (default: from --gpu-memory-utilization)"),
    ("max_num_seqs", int, None, "sequences in one decode server's batch (default %d)"),
    ("max_num_batched_tokens", int, None, "tokens per engine step (default %d)"),
    ("max_model_len", int, None, "context length (default: the model's)"),
    ("seed", int, None, "seed of unseeded sampling and dummy weights (default %d)"),
    ("tensor_parallel_size", int, None, "GPUs each worker's model is split over (default %d)"),
]
# vLLM's other spelling of a flag (the first name is tandem's)
ALIASES = {"num_blocks": ["--num-gpu-blocks-override"], "tensor_parallel_size": ["-tp"]}
# The gateway's admission flags (gateway/server.py, "overload and deadlines"), spelled out:
# importing the gateway here would load FastAPI into every `tandem` process. None: its default.
GATEWAY_FLAGS = [
    ("max_concurrent_requests", int, "generation requests in flight, per gateway process"),
    ("max_queued_requests", int, "requests waiting for a slot, per gateway (0: refuse at once)"),
    ("queue_timeout_s", float, "longest wait for a slot in seconds"),
    ("request_timeout_s", float, "deadline of one generation call to the router, in seconds"),
    ("router_timeout_s", float, "deadline of other router calls, in seconds"),
]


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Each child it starts, and starts again after it exited, prints one line to stdout: "
        "'event=child_started role=ROLE index=I address=HOST:PORT pid=PID restarts=N' (ROLE: "
        "decode, prefill, router, gateway); exits and restarts are logged (logger "
        "tandem.serve). A child that exits is restarted on the same address, after 1 s "
        "doubling to 30 s while it keeps failing."
    )
    p.add_argument("--version", action="version", version=VERSION)
    m = p.add_argument_group("model")
    m.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct); same as --model",
    )
    m.add_argument("--model", default=None, help="the model, as a flag (vLLM accepts both)")
    m.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients pass as `model` (default: the model directory's name)",
    )
    m.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="largest completions `logprobs` / chat `top_logprobs` a request may ask for, "
        "on the gateways, the router and the workers alike (%(default)s)",
    )

    net = p.add_argument_group("addresses")
    net.add_argument("--host", default="127.0.0.1", help="address the gateways (HTTP) listen on")
    net.add_argument("--port", type=_port, default=8000, help="gateway HTTP port (%(default)s)")
    net.add_argument(
        "--internal-host",
        default="127.0.0.1",
        help="address the router, prefill and decode servers (gRPC) and their /metrics listen on",
    )
    net.add_argument(
        "--router-port", type=_port, default=0, help="router gRPC port (default: a free one)"
    )
    net.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="gateways and routers demand it (HTTP Authorization: Bearer, gRPC metadata "
        "authorization: Bearer) (env TANDEM_API_KEY)",
    )
    net.add_argument(
        "--internal-plaintext",
        action="store_true",
        help="development only: internal gRPC in plaintext with a random shared token (env "
        "TANDEM_INTERNAL_TOKEN if set) instead of mutual TLS with throw-away certificates",
    )

    lay = p.add_argument_group("processes")
    lay.add_argument(
        "--prefill", type=int, default=1, help="prefill servers (0: decode servers prefill locally)"
    )
    lay.add_argument("--decode", type=int, default=1, help="decode servers (%(default)s)")
    lay.add_argument(
        "--gateways",
        "--api-server-count",
        type=int,
        default=1,
        help="gateway processes sharing --port (SO_REUSEPORT; vLLM's --api-server-count): "
        "the HTTP/SSE work of many streams on several cores; admission limits are per process",
    )
    lay.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router processes (gateway i uses router i %% N): tokenizing, detokenizing and "
        "the per-token gRPC streams on several cores; with --router-port P they take P, P+1, ...",
    )
    lay.add_argument(
        "--mode",
        choices=["aggregated", "disaggregated"],
        default=None,
        help="aggregated: decode servers prefill locally (same as --prefill 0); "
        "disaggregated: --prefill servers prefill and push KV to the decode servers",
    )
    lay.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds each server may take to become healthy (%(default)s)",
    )

    eng = p.add_argument_group("engine", "passed to every prefill and decode server")
    for name, kind, choices, text in ENGINE_FLAGS:
        flag = "--" + name.replace("_", "-")
        if name in WORKER_DEFAULTS:
            text %= WORKER_DEFAULTS[name]
        eng.add_argument(
            flag, *ALIASES.get(name, []), type=kind, choices=choices, default=None, help=text
        )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of the GPU each decode server may use (default 0.9 aggregated, "
        "0.6 shared among the decode servers when prefill servers share the GPU)",
    )
    eng.add_argument(
        "--prefill-gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of the GPU each prefill server may use (default 0.3 shared among them)",
    )
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of prompt prefixes seen before (default: on)",
    )
    eng.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: every decode step runs eagerly (slower; nothing to capture)",
    )
    eng.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="workers launch each step before the previous one's tokens reach the host"
        " (default: on for CUDA at tensor-parallel size 1)",
    )
    eng.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="decode servers and router: send a request's tokens N at a time (first and last"
        " at once); fewer messages per step at large batches, coarser streaming",
    )
    eng.add_argument(
        "--kv-transport",
        default="auto",
        choices=KV_TRANSPORTS,
        help="KV handoff transport of the prefill and decode servers (auto: cuda_ipc on a"
        " shared GPU, shm between CPU servers, else grpc)",
    )

    rt = p.add_argument_group("router")
    rt.add_argument(
        "--routing-policy",
        default="prefix",
        choices=["prefix", "least_load", "round_robin"],
        help="how the router picks workers (prefix: most cached prompt, weighed by load)",
    )
    rt.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=0,
        help="router: prefill on the decode server when the prompt's part not cached there is"
        " shorter than this many tokens (conditional disaggregation; 0: always remote)",
    )
    rt.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="router: how tool calls are found in chat output (the model's format: hermes"
        " for Qwen2.5/Qwen3/Hermes, llama3_json for Llama 3.x, mistral for Mistral)",
    )
    rt.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='router: serve tool_choice "auto" (needs --tool-call-parser); "required" and a'
        " named function are forced with structured outputs and need neither flag",
    )
    rt.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="router: split chat output into reasoning_content and content (off by default)",
    )
    g = p.add_argument_group("gateway admission", "passed to every gateway (default: its own)")
    for name, kind, text in GATEWAY_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)

    logs = p.add_argument_group("logs")
    logs.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=DEFAULT_LEVEL,
        help="of serve and every process it starts (%(default)s)",
    )
    logs.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="accepted as vLLM's: tandem writes no line per request (the gateway's access "
        "log shows only at --log-level debug), so there is nothing to turn off",
    )
    logs.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="accepted as vLLM's: tandem logs no periodic stats (they are on /metrics), so "
        "there is nothing to turn off",
    )
    add_tls_args(p)  # passed to every process it starts


def check_serve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Settle what argparse cannot check alone; a bad combination exits through parser.error."""
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"MODEL {args.model_tag!r} and --model {args.model!r} differ: give one")
    args.model = args.model or args.model_tag
    if args.gateways < 1 or args.routers < 1:
        parser.error("--gateways and --routers must be >= 1")
    if args.decode < 1 or args.prefill < 0:
        parser.error("--decode must be >= 1 and --prefill >= 0")
    if args.mode == "aggregated":
        args.prefill = 0
    elif args.mode == "disaggregated" and args.prefill == 0:
        parser.error("--mode disaggregated needs --prefill >= 1")
    if args.port == 0:
        parser.error("--port must be a fixed port (1..65535): clients need to know it")
    if args.router_port and args.router_port + args.routers - 1 > 65535:
        parser.error(f"--router-port {args.router_port} leaves no room for {args.routers} routers")
    if args.max_logprobs < 0:
        parser.error("--max-logprobs must be >= 0")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
