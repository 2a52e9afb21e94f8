"""The prefill-policy boundary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router.workers import WorkerHandle


class PrefillPolicy(Protocol):
    """Chooses a prefill server for one prompt.

    `candidates` are the healthy, non-draining prefill workers (never empty). The policy only
    reads worker state; the caller counts the dispatch (in-flight prompt tokens) afterwards.
    """

    def choose(self, candidates: list[WorkerHandle], prompt_ids: list[int]) -> WorkerHandle: ...
