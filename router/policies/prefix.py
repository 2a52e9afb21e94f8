"""Prefix-aware: minimise the tokens a server must compute before this prompt's first token.

    cost(server) = (prompt_len - cached_prefix_tokens(server)) + load_weight * queued_tokens(server)

cached_prefix_tokens comes from the exact prefix index (KV events); queued_tokens is the load
at dispatch time (prompt tokens sent to the server and not yet answered). A long shared prefix
keeps a conversation on the server that holds it until that server's queue costs more than
recomputing the prefix elsewhere.
"""

from __future__ import annotations

import itertools

from tandem.block_hash import hash_prompt_blocks


class PrefixPolicy:
    def __init__(self, load_weight: float = 1.0, **_):
        self.load_weight = load_weight
        self._tiebreak = itertools.count()

    def choose(self, candidates, prompt_ids):
        hashes_by_size: dict[int, list[int]] = {}
        start = next(self._tiebreak) % len(candidates)
        best, best_cost = None, None
        for w in candidates[start:] + candidates[:start]:
            bs = w.block_size
            if bs not in hashes_by_size:
                hashes_by_size[bs] = hash_prompt_blocks(prompt_ids, bs) if bs > 0 else []
            cached = w.blocks.num_matched(hashes_by_size[bs]) * bs
            cost = (len(prompt_ids) - cached) + self.load_weight * w.prefill_load()
            if best_cost is None or cost < best_cost:
                best, best_cost = w, cost
        return best
