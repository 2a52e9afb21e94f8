"""Startup forwards that compile the kernel variants the first traffic would otherwise compile."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from tandem.host_inputs import HostInputs
from tandem.step_inputs import StepInputs

log = logging.getLogger(__name__)


@torch.inference_mode()
def warm_up_kernels(
    model: nn.Module,
    inputs: StepInputs,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    max_len: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
) -> None:
    """Compile, at startup, the kernel variants that the first traffic would otherwise
    compile mid-step (a second or more each, stalling every running request): prefill
    chunks on both sides of the tile-size switch at 1k tokens, a mixed step (decode rows
    + a chunk) and decode batches outside CUDA graphs. Tiny eager forwards over the real
    cache that write no KV (slot -1) and whose outputs are dropped; every tensor-parallel
    rank runs the same ones in the same order (the all-reduces inside). max_len: the block
    tables' full width in tokens (>= max_model_len), so positions stay in range."""
    t0 = time.perf_counter()
    dev, bs = inputs.device, inputs.block_size
    lengths = [16]
    if min(max_num_batched_tokens, max_len) > 1024:
        lengths.append(min(max_num_batched_tokens, max_len, 1040))
    batches: list[tuple[list[int], list[int]]] = [([n], [n]) for n in lengths]
    batches.append(([1, 1, 16], [17, 17, 16]))  # mixed: 2 decode rows, then a chunk
    # decode batches within the step limits (the profile pass sized activations for them)
    most = min(max_num_seqs, max_num_batched_tokens)
    batches += [([1] * b, [17] * b) for b in (1, 256) if b <= most]
    for q_lens, seq_lens in batches:
        # the steps' own inputs (StepInputs.device_inputs), every slot -1 and every block 0
        starts = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=starts[1:])
        pos = [p for q, s in zip(q_lens, seq_lens, strict=True) for p in range(s - q, s)]
        width = inputs.tables.width(-(-max(seq_lens) // bs))
        host = HostInputs(
            input_ids=np.zeros(len(pos), dtype=np.int64),
            positions=np.array(pos, dtype=np.int64),
            slots=np.full(len(pos), -1, dtype=np.int64),
            seq_lens=np.array(seq_lens, dtype=np.int32),
            query_start_loc=starts,
            block_tables=np.zeros((len(q_lens), width), dtype=np.int32),
            logits_rows=[],
            max_query_len=max(q_lens),
        )
        model(*inputs.device_inputs(host), kv_caches)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    log.info("event=kernels_warmed_up seconds=%.2f", time.perf_counter() - t0)
