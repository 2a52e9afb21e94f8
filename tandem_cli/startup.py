"""What `tandem serve` checks before it starts anything, and the banner it prints once serving.

Ports first: a second `tandem serve` on a taken port must say so at once, not load every model,
announce itself (its health check would reach the other stack's gateway) and crash later.

The banner reads the running stack, not serve's flags: the KV cache each decode server
allocated (Decode.Stats, which admits the router role only under mutual TLS) and the context
length the router serves (Router.ListModels).
"""

from __future__ import annotations

import errno
import json
import socket
from dataclasses import dataclass
from pathlib import Path

from rpc.tls import TLSConfig, channel
from tandem_cli.serve_flags import VERSION

STATS_TIMEOUT_S = 10.0


def bind_error(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now, or None if it could.

    Binds the way uvicorn and grpc do (SO_REUSEADDR, every address the host resolves to), so a
    port left in TIME_WAIT by a stack that just stopped counts as free, and one that another
    process listens on (even with SO_REUSEPORT, as several gateways do) counts as taken."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        return f"cannot resolve host {host!r}: {e.strerror}"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds: IPv6 only, IPv4 checked apart
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return (
                        f"port {port} on {host} is in use: another process holds it (another "
                        "`tandem serve`?); stop it or choose another port"
                    )
                return f"cannot listen on {host}:{port}: {e.strerror}"
    return None


def check_ports(args) -> None:
    """Exit (status 1) naming the first port of serve's that cannot be bound, before anything
    is loaded or started. Only fixed ports: the others are picked free later."""
    wanted = [("--port", args.host, args.port)]
    if args.router_port:
        for i in range(args.routers):
            wanted.append(("--router-port", args.internal_host, args.router_port + i))
    for flag, host, port in wanted:
        error = bind_error(host, port)
        if error:
            raise SystemExit(f"tandem serve: {flag} {port}: {error}")


def url_host(host: str) -> str:
    """host as it goes into a URL (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class DecodeCapacity:
    address: str
    num_kv_tokens: int = 0  # num_total_blocks * block_size
    num_blocks: int = 0
    block_size: int = 0
    error: str = ""  # why Stats gave nothing


def decode_capacity(address: str, tls: TLSConfig) -> DecodeCapacity:
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    try:
        with channel(address, tls, peer_role="decode") as ch:
            stats = worker_pb2_grpc.DecodeStub(ch).Stats(
                worker_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S
            )
    except grpc.RpcError as e:
        return DecodeCapacity(address, error=f"Stats: {e.code().name}")
    n, size = stats.num_total_blocks, stats.block_size
    return DecodeCapacity(address, n * size, n, size)


def router_max_model_len(address: str, tls: TLSConfig, api_key: str) -> int:
    """The context length the router serves (0: it did not say)."""
    import grpc

    from protos import router_pb2, router_pb2_grpc

    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    try:
        with channel(address, tls, peer_role="router") as ch:
            resp = router_pb2_grpc.RouterStub(ch).ListModels(
                router_pb2.ListModelsRequest(), metadata=metadata, timeout=STATS_TIMEOUT_S
            )
    except grpc.RpcError:
        return 0
    return max((m.max_model_len for m in resp.models), default=0)


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """What the workers resolve `auto` to on this host (their rule: tandem.config)."""
    import torch  # already loaded: serve prepared the model with the core's loader

    from tandem.config import resolve_dtype

    if device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    return dev.type, str(resolve_dtype(dtype or "auto", dev)).removeprefix("torch.")


def model_config_len(model_dir: Path) -> int:
    try:
        return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass
class Banner:
    """Everything the startup banner says; lines() lays it out."""

    served: str
    model: str
    base_url: str
    metrics_url: str
    routers: list[str]
    num_gateways: int
    num_prefill: int
    num_decode: int
    internal: str  # InternalPlane.describe()
    client_credentials: str  # how to reach the router's gRPC API
    device: str
    dtype: str
    tensor_parallel_size: int
    decode: list[DecodeCapacity]
    max_model_len: int
    max_num_seqs: int

    def lines(self) -> list[str]:
        # the first line is the one scripts and tests look for ("tandem is serving", the URL,
        # "router grpc", the certificate directory in parentheses)
        router_list = ", ".join(self.routers)
        out = [
            f"tandem is serving {self.served} at {self.base_url} ({self.num_gateways} "
            f"gateway(s); router grpc {router_list}; {self.num_prefill} prefill, "
            f"{self.num_decode} decode; {self.internal}). Ctrl-C stops."
        ]
        rows = [
            ("version", VERSION),
            ("model", f"{self.served} ({self.model})"),
            ("device", f"{self.device}, dtype {self.dtype}, tensor-parallel size "
                       f"{self.tensor_parallel_size}"),
            ("KV cache", self._kv_cache()),
            ("concurrency", self._concurrency()),
            ("OpenAI API", self.base_url),
            ("gRPC router", f"{router_list} ({self.client_credentials})"),
            ("metrics", self.metrics_url),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        out += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        return out

    def _kv_cache(self) -> str:
        known = [d for d in self.decode if not d.error]
        parts = []
        for d in self.decode:
            if d.error:
                parts.append(f"{d.address}: unknown ({d.error})")
            else:
                parts.append(
                    f"{d.address}: {d.num_kv_tokens:,} tokens ({d.num_blocks} blocks of "
                    f"{d.block_size})"
                )
        total = sum(d.num_kv_tokens for d in known)
        return "; ".join(parts) + (f"; {total:,} tokens in all" if len(known) > 1 else "")

    def _concurrency(self) -> str:
        text = f"{self.max_num_seqs} sequences per decode server (--max-num-seqs)"
        total = sum(d.num_kv_tokens for d in self.decode if not d.error)
        if self.max_model_len and total:
            ratio = total / self.max_model_len
            text += (
                f"; the KV cache holds {ratio:.2f}x requests of the full "
                f"{self.max_model_len:,}-token context"
            )
        return text
