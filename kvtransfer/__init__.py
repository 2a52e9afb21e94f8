"""KV handoff between prefill and decode servers; transports are picked by name."""

from kvtransfer.base import HandoffState, KVDest, KVSender, KVSlice, plan_slices

TRANSPORTS = ("grpc",)

__all__ = ["HandoffState", "KVDest", "KVSender", "KVSlice", "TRANSPORTS", "plan_slices"]
