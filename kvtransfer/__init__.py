"""KV handoff from prefill to decode servers.

One interface for every transport (kvtransfer/base.py): a prefill server's `KVSender.send(dest,
source, first token)` moves a request's KV into the blocks a decode server reserved, and
returns once that server completed the handoff; the decode server's one KVTransfer.Transfer
service (kvtransfer/receiver.py) drives its `HandoffLedger` (kvtransfer/ledger.py: reserved ->
receiving -> complete | failed | reclaimed, with a lease and a stall deadline) the same way
for every transport, a small `KVReceiver` per transport doing the rest.

Trust: a handoff's KVTarget carries a capability the decode server issued for it alone; a
Transfer call without it changes nothing, and with it writes only that handoff's own blocks,
never the prefix-cached ones other requests share (kvtransfer/receiver.py says what exactly
it guarantees). A prefill server opens only its host's live pool files (kvtransfer/pool.py).

Transports, picked by name (kvtransfer/registry.py) per handoff (kvtransfer/select.py):
    grpc      the KV's bytes in the Transfer call (any hosts, any tensor-parallel sizes)
    shm       same host, CPU: the sender writes the decode pool's /dev/shm file itself
    cuda_ipc  same GPU: the sender writes the decode pool through a CUDA IPC handle
"""
