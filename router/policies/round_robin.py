"""Round robin: ignores load and cache (the baseline the prefix policy is measured against)."""

from __future__ import annotations

import itertools


class RoundRobinPolicy:
    def __init__(self, **_):
        self._counter = itertools.count()

    def choose(self, candidates, prompt_ids):
        return candidates[next(self._counter) % len(candidates)]
