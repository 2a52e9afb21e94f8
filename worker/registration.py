"""Self-registration of a prefill or decode server with the router's Registry.

    connecting --Register ok--> registered --Heartbeat every interval--> registered
        ^   router down: retry with backoff        |
        +------ Heartbeat says known=false --------+   (the router restarted or dropped us)
    drain():  Deregister once; heartbeats go on, so the router keeps the entry (and the
              streams it still has here) until they end; never registers again.
    refused:  the router rejects the worker (wrong model, bad WorkerInfo, a credential or
              certificate role it does not accept): `refused` is set and the server shuts
              down, since retrying cannot help.
    address taken (ALREADY_EXISTS): a static worker of the router, or a registered one that
              still heartbeats, holds the address; retried with backoff, since the holder may
              be this server's previous life whose entry expires soon.

Heartbeats send the last load snapshot (`load()`) and never wait on the engine, so a long
engine step cannot make the router think the worker is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel

log = logging.getLogger("tandem.worker.registration")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0
RPC_TIMEOUT_S = 5.0
_REFUSED = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


def role_name(role: int) -> str:
    return worker_pb2.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower()


class RegistryClient:
    def __init__(
        self,
        router_address: str,
        info: worker_pb2.WorkerInfo,
        load: Callable[[], worker_pb2.WorkerStats],
        tls: TLSConfig = PLAINTEXT,  # the worker's files, as client credentials
    ) -> None:
        self.router_address = router_address
        self.info = info
        self.load = load  # latest load snapshot; must not block
        self.worker_id = ""  # empty while not registered
        self.interval_s = 1.0  # replaced by the router's heartbeat_interval_ms
        self.draining = False
        self.refused = asyncio.Event()
        self._backoff = FIRST_BACKOFF_S
        self._channel = aio_channel(router_address, tls, peer_role="router")
        self._stub = worker_pb2_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    async def deregister(self) -> bool:
        """Stop receiving new work. True when the router confirmed it."""
        self.draining = True
        if not self.worker_id:
            return False
        try:
            await self._stub.Deregister(
                worker_pb2.DeregisterRequest(worker_id=self.worker_id), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "event=deregister_failed router=%s code=%s", self.router_address, e.code().name
            )
            return False
        return True

    async def _run(self) -> None:
        while True:
            if not self.worker_id:
                if self.draining:
                    return  # never join again once draining
                if not await self._register():
                    return  # refused
                continue
            await asyncio.sleep(self.interval_s)
            await self._heartbeat()

    async def _register(self) -> bool:
        """One Register attempt (sleeping the backoff after a failure); False when refused."""
        backoff = self._backoff
        try:
            resp = await self._stub.Register(self.info, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() in _REFUSED:
                log.error(
                    "event=register_refused router=%s code=%s detail=%s",
                    self.router_address, e.code().name, e.details(),
                )  # fmt: skip
                self.refused.set()
                return False
            level = logging.WARNING if backoff == FIRST_BACKOFF_S else logging.DEBUG
            log.log(
                level,
                "event=register_retry router=%s code=%s detail=%s backoff_s=%.1f",
                self.router_address, e.code().name, e.details(), backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            self._backoff = min(backoff * 2, MAX_BACKOFF_S)
            return True
        self._backoff = FIRST_BACKOFF_S
        self.worker_id = resp.worker_id
        self.interval_s = (resp.heartbeat_interval_ms or 1000) / 1000
        log.info(
            "event=worker_registered worker_id=%s role=%s address=%s router=%s heartbeat_ms=%d",
            resp.worker_id, role_name(self.info.role), self.info.address,
            self.router_address, resp.heartbeat_interval_ms,
        )  # fmt: skip
        if self.draining:  # SIGTERM arrived while Register was in flight
            await self.deregister()
        return True

    async def _heartbeat(self) -> None:
        s = self.load()
        load = worker_pb2.WorkerLoad(
            worker_id=self.worker_id,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            in_flight_prompt_tokens=s.in_flight_prompt_tokens,
        )
        try:
            resp = await self._stub.Heartbeat(load, timeout=max(self.interval_s, 1.0))
        except grpc.aio.AioRpcError as e:
            # The router is down or slow: keep the id; if it restarted, the next answered
            # heartbeat says known=false and we register again.
            log.info("event=heartbeat_failed router=%s code=%s", self.router_address, e.code().name)
            return
        if not resp.known:
            log.warning(
                "event=router_forgot_worker worker_id=%s router=%s draining=%s",
                self.worker_id, self.router_address, self.draining,
            )  # fmt: skip
            self.worker_id = ""
