"""Tensor parallelism: one process per rank, rank 0 drives, the others mirror its forward.

group.py     the ranks' process groups and the collectives the model calls
sharding.py  which slice of each checkpoint tensor a rank holds
step_sync.py rank 0 -> other ranks: each step's inputs (tensors over torch.distributed)
launch.py    rank 0 starts ranks 1..N-1 as child processes; worker.py is their main loop
kv_copy.py   the KV handoff's gather and scatter over the ranks' KV heads
"""
