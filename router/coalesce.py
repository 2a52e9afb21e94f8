"""Coalescing a request's ChoiceChunks on their way to the client.

The choice tasks put one chunk per worker message on the request's queue; the Generate
stream takes them when gRPC has sent the previous message. When that stream lags (the
gateway, or the network, is slower than the tokens come), several chunks are waiting: they
leave as ONE chunk per choice, so the per-message cost (protobuf, gRPC write, the gateway's
parse and SSE write) is paid once for all of them. When the stream keeps up, the queue holds
one chunk at a time and nothing changes: one message per worker message.

stream_interval (vLLM's --stream-interval) additionally holds a choice's tokens until N of
them are waiting (its first chunk and its final chunk always go at once).
"""

from __future__ import annotations

from dataclasses import replace

from router.types import ChoiceChunk, FinishReason


def merge_into(acc: ChoiceChunk, c: ChoiceChunk) -> None:
    """Append c (the next chunk of the same choice) to acc; nothing dropped or reordered."""
    acc.token_ids += c.token_ids
    acc.text += c.text
    acc.logprobs += c.logprobs  # one entry per token, still parallel to token_ids
    acc.reasoning_text += c.reasoning_text
    acc.prompt_logprobs += c.prompt_logprobs  # only a choice's first chunk has them
    for d in c.tool_calls:  # a later piece of the same call appends to its arguments
        last = acc.tool_calls[-1] if acc.tool_calls else None
        if last is not None and last.index == d.index and not d.id and not d.name:
            acc.tool_calls[-1] = replace(last, arguments=last.arguments + d.arguments)
        else:
            acc.tool_calls.append(d)
    if c.finish_reason != FinishReason.NONE:
        acc.finish_reason, acc.stop_reason = c.finish_reason, c.stop_reason
        acc.timing, acc.num_cached_tokens = c.timing, c.num_cached_tokens


class Coalescer:
    """Per-choice buffers between the choice tasks and the Generate stream."""

    def __init__(self, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        self.interval = stream_interval
        self.held: dict[int, ChoiceChunk] = {}  # choice index -> chunks not sent yet, merged
        self.started: set[int] = set()  # choices whose first chunk was sent
        self.echo: list[ChoiceChunk] = []  # echo chunks: never merged (see add)

    def add(self, chunk: ChoiceChunk) -> None:
        acc = self.held.get(chunk.index)
        if acc is None:
            self.held[chunk.index] = chunk
        elif acc.prompt_token_ids:
            # An echo chunk (prompt text + the first token) leaves as it is: the gateway
            # finds where the prompt text ends in it from its one token's text.
            self.echo.append(acc)
            self.started.add(acc.index)
            self.held[chunk.index] = chunk
        else:
            merge_into(acc, chunk)

    def take(self) -> list[ChoiceChunk]:
        """The chunks to send now (one per choice at most, but for echo chunks), in the order
        choices arrived."""
        out, self.echo = self.echo, []
        if self.interval == 1:
            out += self.held.values()
            self.held.clear()
            return out
        for i, acc in list(self.held.items()):
            if (
                i not in self.started  # the first token goes at once (TTFT)
                or acc.finish_reason != FinishReason.NONE
                or len(acc.token_ids) >= self.interval
            ):
                self.started.add(i)
                out.append(self.held.pop(i))
        return out
