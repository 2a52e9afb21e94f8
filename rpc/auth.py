"""Who may call what on the internal gRPC plane (torch-free, grpc only).

Every tandem gRPC server runs `AuthInterceptor`. It decides per RPC, before the servicer
sees anything, from one of two credentials:

    mutual TLS   the caller's certificate carries its role (rpc/pki.py: the DNS name
                 `<role>.tandem.internal`); each service admits only the roles that need it
    shared token plaintext development mode only: metadata `tandem-internal-token` must equal
                 the server's token (env TANDEM_INTERNAL_TOKEN); no roles

    service                 roles (mutual TLS)        also
    tandem.v1.Router        gateway, client           `authorization: Bearer <api key>` when
                                                      the router has --api-key
    tandem.v1.Registry      prefill, decode           the registry checks WorkerInfo.role
                                                      against the caller's role
    tandem.v1.Decode        router
    tandem.v1.Prefill       router
    tandem.v1.KVTransfer    prefill                   a per-handoff token from the decode
                                                      server (kvtransfer/receiver.py)
    health, reflection      any role                  (health: open in token mode, for probes)

A server with neither credential (plaintext, no token) admits everyone and says so loudly at
start (`warn_if_open`). A refused call ends with UNAUTHENTICATED (no or wrong credential) or
PERMISSION_DENIED (a valid certificate of a role that may not call this), and the servicer
never runs.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Iterable

import grpc

from rpc.pki import role_of_name
from rpc.tls import TLSConfig
from rpc.token_channel import TOKEN_METADATA

log = logging.getLogger("tandem.auth")

API_KEY_METADATA = "authorization"

ANY_ROLE = frozenset({"gateway", "router", "prefill", "decode", "client"})
# method prefix -> roles allowed to call it under mutual TLS
SERVICE_ROLES: dict[str, frozenset[str]] = {
    "/tandem.v1.Router/": frozenset({"gateway", "client"}),
    "/tandem.v1.Registry/": frozenset({"prefill", "decode"}),
    "/tandem.v1.Decode/": frozenset({"router"}),
    "/tandem.v1.Prefill/": frozenset({"router"}),
    "/tandem.v1.KVTransfer/": frozenset({"prefill"}),
    "/grpc.health.v1.Health/": ANY_ROLE,
    "/grpc.reflection.v1alpha.ServerReflection/": ANY_ROLE,
    "/grpc.reflection.v1.ServerReflection/": ANY_ROLE,
}
PUBLIC_PREFIX = "/tandem.v1.Router/"  # the API-key service
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def peer_roles(context: grpc.aio.ServicerContext) -> frozenset[str]:
    """The roles in the caller's verified certificate (empty without one)."""
    ctx = context.auth_context()
    names = ctx.get("x509_subject_alternative_name", ()) or ()
    return frozenset(r for n in names if (r := role_of_name(n.decode(errors="replace"))))


def _roles_for(method: str) -> frozenset[str] | None:
    for prefix, roles in SERVICE_ROLES.items():
        if method.startswith(prefix):
            return roles
    return None


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
    """(internal token, api key) from the call's metadata."""
    token = key = ""
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if name == TOKEN_METADATA:
            token = value
        elif name == API_KEY_METADATA and value.lower().startswith("bearer "):
            key = value[7:].strip()
    return token, key


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the credential their service needs (table in the docstring)."""

    def __init__(self, tls: TLSConfig, api_key: str = "") -> None:
        self.check_roles = tls.require_client_cert  # every caller has a verified certificate
        self.token = tls.token
        self.api_key = api_key

    def _refusal(self, method: str, metadata, context) -> tuple[grpc.StatusCode, str] | None:
        token, key = _bearer(metadata)
        if self.check_roles:
            allowed = _roles_for(method)
            if allowed is None:
                return None  # not ours: grpc answers UNIMPLEMENTED
            roles = peer_roles(context)
            if not roles & allowed:
                have = ", ".join(sorted(roles)) or "no tandem role"
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method}: a certificate with role {' or '.join(sorted(allowed))} is "
                    f"required (the caller's has {have})",
                )
        elif self.token and not method.startswith(HEALTH_PREFIX):
            if not _same(token, self.token):
                return (
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{method}: missing or wrong internal token ({TOKEN_METADATA})",
                )
        if self.api_key and method.startswith(PUBLIC_PREFIX) and not _same(key, self.api_key):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong API key (metadata 'authorization: Bearer <key>')",
            )
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (self.check_roles or self.token or self.api_key):
            return handler
        method = details.method
        # grpc picks how to run a handler by its function type (coroutine, async generator),
        # so each wrapper has the type of what it wraps; the check runs once per call
        if handler.request_streaming and handler.response_streaming:
            inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            inner, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            inner, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        refusal = self._refusal

        if inspect.isasyncgenfunction(inner):

            async def behavior(request, context):
                refused = refusal(method, context.invocation_metadata(), context)
                if refused is not None:
                    await context.abort(*refused)
                async for response in inner(request, context):
                    yield response

        else:

            async def behavior(request, context):
                refused = refusal(method, context.invocation_metadata(), context)
                if refused is not None:
                    await context.abort(*refused)
                return await inner(request, context)

        return make(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def server_interceptors(tls: TLSConfig, api_key: str = "") -> list[grpc.aio.ServerInterceptor]:
    return [AuthInterceptor(tls, api_key)]


def warn_if_open(tls: TLSConfig, what: str) -> None:
    """Never silent: say at start how this server authenticates its callers."""
    if tls.require_client_cert:
        return
    if tls.token:
        log.warning(
            'event=internal_auth mode=token server=%s detail="callers are authenticated by a '
            'shared token only%s (development mode; use mutual TLS, e.g. tandem certs)"',
            what, "" if tls.enabled else ", sent in plaintext",
        )  # fmt: skip
    else:
        log.warning(
            'event=internal_auth mode=none server=%s detail="anyone who can reach this port can '
            "call it (no --tls-require-client-cert and no TANDEM_INTERNAL_TOKEN); tandem serve "
            'sets up mutual TLS by itself, tandem certs writes certificates for other setups"',
            what,
        )
