"""KV handoff between prefill and decode servers (only the `grpc` transport exists so far)."""

from kvtransfer.base import HandoffState, KVDest, KVSender, KVSlice, plan_slices

__all__ = ["HandoffState", "KVDest", "KVSender", "KVSlice", "plan_slices"]
