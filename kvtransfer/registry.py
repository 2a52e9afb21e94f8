"""KV transports by name (`--kv-transport`, KVTarget.transports, KVBegin.transport), best
first: auto mode takes the first one a handoff can use. One file per implementation; a new
transport (e.g. `nixl`: another GPU or host, written straight into the reserved blocks) is
one more file and one more entry in each table."""

from __future__ import annotations

from kvtransfer.base import KVReceiver, KVSender
from kvtransfer.cuda_ipc_transport import CudaIpcReceiver, CudaIpcSender
from kvtransfer.grpc_transport import GrpcReceiver, GrpcSender
from kvtransfer.shm_transport import ShmReceiver, ShmSender

SENDERS: dict[str, type[KVSender]] = {s.name: s for s in (CudaIpcSender, ShmSender, GrpcSender)}
RECEIVERS: dict[str, type[KVReceiver]] = {
    r.name: r for r in (CudaIpcReceiver, ShmReceiver, GrpcReceiver)
}
