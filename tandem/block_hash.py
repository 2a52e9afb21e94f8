"""Chained block hashes for prefix caching, shared by the workers and the router's prefix index.

Pure Python with no heavy imports: the router (which never imports torch) hashes prompts with
the same function the workers use, so a hash the router computes names the same cached block.

    hash(block i) = H(hash(block i-1) || token ids of block i)

A block's hash therefore identifies the whole prefix up to and including it.
"""

from __future__ import annotations

import hashlib
from array import array


def hash_block_tokens(parent_hash: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update((parent_hash or 0).to_bytes(8, "little"))
    h.update(array("i", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(
    token_ids: list[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Hashes of the full blocks of token_ids (a trailing partial block is not hashed)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
