"""Least load: fewest prompt tokens queued on the server, measured at dispatch time."""

from __future__ import annotations

import itertools


class LeastLoadPolicy:
    def __init__(self, **_):
        self._tiebreak = itertools.count()

    def choose(self, candidates, prompt_ids):
        # Rotate the start so equal loads spread instead of piling on the first server.
        start = next(self._tiebreak) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda w: w.prefill_load())
