"""The flags every worker (prefill and decode) takes, named like `vllm serve`'s, and the
engine config built from them. `tandem serve` spells the same choices out (it must not load
torch); tests/e2e/test_serve_flags.py keeps the two equal."""

from __future__ import annotations

import argparse

from kvtransfer.select import CHOICES
from rpc.tls import add_tls_args
from tandem.async_engine import DEFAULT_MAX_NUM_WAITING
from tandem.config import EngineConfig
from tandem.log_config import DEFAULT_LEVEL, LEVELS
from tandem.validation import MAX_TOP_LOGPROBS
from tandem_kernels.registry import available_backends

# vLLM's --dtype choices; tandem.config.resolve_dtype reads each of them
DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
LOAD_FORMATS = ["auto", "safetensors", "gguf", "dummy"]  # what EngineConfig accepts


def add_engine_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=default_port, help="gRPC port (%(default)s)")
    p.add_argument(
        "--advertise-host",
        default=None,
        help="host the router and peers use to reach this server (default: --host; for a"
        " wildcard --host, this machine's address)",
    )
    p.add_argument(
        "--served-model-name", default="", help="model name told to the router and in metrics"
    )
    p.add_argument(
        "--router",
        default="",
        metavar="HOST:PORT",
        help="register with this router once serving, heartbeat, deregister on SIGTERM",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight requests before stopping anyway",
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus HTTP port on --host (0: off)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="where the engine runs (auto: cuda when a GPU is visible)",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="weights format (auto: from the files; dummy: random weights)",
    )
    p.add_argument(
        "--kernel-backend",
        default="auto",
        choices=["auto", *available_backends()],
        help="kernels (auto: triton on CUDA when importable, torch otherwise)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (%(default)s)")
    p.add_argument(
        "--num-blocks",
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="KV blocks (default: from --gpu-memory-utilization, or 1 GiB on CPU)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of the GPU this server may use, weights and KV cache (%(default)s)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences in the batch (%(default)s)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per engine step; longer prompts are prefilled in chunks (%(default)s)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of prompt prefixes seen before (default: on)",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=MAX_TOP_LOGPROBS,
        help="largest top_logprobs a request may ask for (%(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of unseeded sampling, dummy weights (%(default)s)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the model over this many GPUs (ranks; one process each, started here)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule and launch each step before the previous step's tokens reach the host"
        " (default: on for CUDA at tensor-parallel size 1)",
    )
    p.add_argument(
        "--cuda-graph-max-batch-size",
        type=int,
        default=512,
        help="largest decode batch captured as a CUDA graph (larger batches run eagerly)",
    )
    p.add_argument(
        "--max-num-waiting",
        type=int,
        default=DEFAULT_MAX_NUM_WAITING,
        help="waiting-queue bound; beyond it new requests get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--kv-transport",
        default="auto",
        choices=CHOICES,
        help="KV handoff transport. auto: decode servers offer cuda_ipc (CUDA pool) or shm"
        " (CPU pool) and grpc; prefill servers pick cuda_ipc on the same GPU, shm between CPU"
        " servers of one host, else grpc. Any other value forces that one on this server",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="hand a request's tokens to its stream N at a time (first and last at once):"
        " N times fewer gRPC messages per step at large batches, coarser streaming",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=DEFAULT_LEVEL,
        help="least severe log level written to stderr (%(default)s)",
    )
    add_tls_args(p)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        kernel_backend=args.kernel_backend,
        seed=args.seed,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        cuda_graph_max_batch_size=args.cuda_graph_max_batch_size,
        kv_cache_file=getattr(args, "kv_cache_file", ""),  # set by `tandem decode` for shm
        tensor_parallel_size=args.tensor_parallel_size,
        max_logprobs=args.max_logprobs,
    )
