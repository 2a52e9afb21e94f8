"""Stop strings over a streamed text.

Text that could still become the start of a stop string is held back (only the longest
suffix that is a prefix of some stop string), so the client never sees a stop string, even
when it spans token boundaries. On a match the output is cut before it (or after it with
include_stop_str_in_output) and the choice finishes with reason "stop".
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include_stop_str_in_output
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all text of the choice so far (truncated at a match)
        self.emitted = 0  # chars of self.text already returned

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add decoded text; returns (text safe to emit now, matched stop string or None)."""
        if not self.stops:
            return delta, None
        # A new match must overlap the new text: start max_len-1 chars before it.
        search_from = max(0, len(self.text) - self.max_len + 1)
        self.text += delta
        best: tuple[int, str] | None = None
        for s in self.stops:
            pos = self.text.find(s, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            end = pos + len(s) if self.include else pos
            self.text = self.text[:end]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out, s
        safe_end = len(self.text) - self._held_len()
        out = self.text[self.emitted : safe_end] if safe_end > self.emitted else ""
        self.emitted = max(self.emitted, safe_end)
        return out, None

    def flush(self) -> str:
        """The held-back tail, when the choice ends for another reason."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _held_len(self) -> int:
        for k in range(min(self.max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
