"""Coalescing at the router: a Generate stream that lags gets a choice's queued chunks merged.

The lagging consumer reads one chunk, then does not read again until every choice task has
finished (so all their chunks are queued); it must get fewer messages than tokens carrying
exactly what the eager consumer got: token ids, text, per-token logprobs, finish and usage.
"""

import asyncio

import pytest
from router_fakes import EOS, start_stack

from router.coalesce import Coalescer
from router.tokenizer import RouterTokenizer
from router.types import ChoiceChunk, FinishReason, GenerateInput
from tandem.records import Logprob, SamplingParams

pytestmark = pytest.mark.timeout(60)

TEXT = "héllo wörld 你好 😀 The quick brown fox jumps over the lazy dog."


async def _consume(engine, gi: GenerateInput, lag: bool) -> list[ChoiceChunk]:
    gen = engine.generate(gi)
    chunks = [await anext(gen)]
    if lag:  # everything the choices will ever send is queued before the next read
        await asyncio.gather(*engine.running[gi.request_id], return_exceptions=True)
    chunks += [c async for c in gen]
    return chunks


def _per_choice(chunks: list[ChoiceChunk], n: int) -> list[dict]:
    out = []
    for i in range(n):
        mine = [c for c in chunks if c.index == i]
        assert [c.finish_reason != FinishReason.NONE for c in mine].count(True) == 1
        assert mine[-1].finish_reason != FinishReason.NONE  # nothing after the finish
        out.append(
            {
                "token_ids": [t for c in mine for t in c.token_ids],
                "text": "".join(c.text for c in mine),
                "logprobs": [lp for c in mine for lp in c.logprobs],
                "finish": (mine[-1].finish_reason, mine[-1].stop_reason),
                "cached": mine[-1].num_cached_tokens,
                "prompt_token_ids": [t for c in mine for t in c.prompt_token_ids],
                "has_timing": mine[-1].timing is not None and mine[-1].timing.ttft_ms > 0,
            }
        )
    return out


def _input(rid: str, **kw) -> GenerateInput:
    top_logprobs = kw.pop("top_logprobs", 0)
    sampling = SamplingParams(
        temperature=0.0,
        max_tokens=kw.pop("max_tokens", 64),
        logprobs=top_logprobs if kw.pop("logprobs", False) else None,
        stop=kw.pop("stop", []),
        include_stop_str_in_output=kw.pop("include_stop_str_in_output", False),
    )
    return GenerateInput(request_id=rid, model="", text="x", sampling=sampling, **kw)


CASES = {
    # split UTF-8 characters, EOS (its text is not output), per-token logprobs
    "eos_utf8_logprobs": dict(logprobs=True, top_logprobs=2),
    # a stop string that spans tokens (and so messages of the eager run)
    "stop_string": dict(stop=["x jum"]),
    "stop_string_included": dict(stop=["brown f"], include_stop_str_in_output=True),
    "n3": dict(n=3, logprobs=True),
    "echo": dict(echo=True, logprobs=True, top_logprobs=1),
    "length": dict(max_tokens=9),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_prefill", [0, 1])
def test_lagging_stream_gets_merged_chunks_with_identical_content(model_dir, case, num_prefill):
    tok = RouterTokenizer(model_dir)
    script = tok.encode(TEXT) + [EOS]
    kw = CASES[case]

    async def scenario():
        stack = await start_stack(model_dir, script, num_prefill=num_prefill, num_decode=1)
        try:
            engine = stack.router.engine
            eager = await _consume(engine, _input("eager", **kw), lag=False)
            lagged = await _consume(engine, _input("lagged", **kw), lag=True)
            return eager, lagged
        finally:
            await stack.stop()

    eager, lagged = asyncio.run(scenario())
    n = kw.get("n", 1)
    want, got = _per_choice(eager, n), _per_choice(lagged, n)
    assert got == want
    num_tokens = sum(len(c["token_ids"]) for c in got)
    assert num_tokens > 3 * n
    # the batch read before the lag (at most one chunk per choice), then at most one per
    # choice: all the rest merged
    assert len(lagged) <= 2 * n < num_tokens
    if case == "echo":  # the echo chunk (prompt text + the first read's tokens) comes first;
        # over a session the first read may hold more than one token
        assert lagged[0].prompt_token_ids == eager[0].prompt_token_ids != []
        assert lagged[0].token_ids[:1] == eager[0].token_ids[:1]
    assert all(len(c.logprobs) == len(c.token_ids) for c in lagged if kw.get("logprobs"))
    # usage once, on the very last chunk, with the same counts
    assert [c.usage for c in lagged if c.usage is not None] == [lagged[-1].usage]
    assert lagged[-1].usage == eager[-1].usage
    assert lagged[-1].usage.completion_tokens == num_tokens
    if case == "stop_string":
        assert got[0]["text"] == TEXT[: TEXT.index("x jum")]
    if case == "eos_utf8_logprobs":
        assert got[0]["text"] == TEXT and got[0]["finish"] == (FinishReason.STOP, str(EOS))


def _chunk(index: int, tokens: list[int], finish=FinishReason.NONE, **kw) -> ChoiceChunk:
    lps = [Logprob(t, -0.1 * t, [(t + 1, -1.0)]) for t in tokens]
    return ChoiceChunk(
        index, list(tokens), "".join(f"<{t}>" for t in tokens), lps, finish_reason=finish, **kw
    )


def _stream(n_tokens: int, index: int = 0) -> list[ChoiceChunk]:
    chunks = [_chunk(index, [t]) for t in range(n_tokens - 1)]
    return chunks + [_chunk(index, [n_tokens - 1], FinishReason.LENGTH, stop_reason="")]


def _flatten(chunks: list[ChoiceChunk]):
    return (
        [t for c in chunks for t in c.token_ids],
        "".join(c.text for c in chunks),
        [lp for c in chunks for lp in c.logprobs],
    )


def test_keeping_up_changes_nothing():
    co = Coalescer()
    sent = []
    for c in _stream(6):
        co.add(c)
        sent += co.take()
    assert [len(c.token_ids) for c in sent] == [1] * 6
    assert sent[-1].finish_reason == FinishReason.LENGTH


def test_queued_chunks_merge_per_choice_in_order():
    a, b = _stream(5, index=0), _stream(3, index=1)
    want_a, want_b = _flatten(_stream(5)[:4]), _flatten(_stream(3, index=1))
    co = Coalescer()
    for c in [a[0], b[0], a[1], a[2], b[1], b[2], a[3]]:
        co.add(c)
    sent = co.take()
    assert [c.index for c in sent] == [0, 1]
    assert _flatten([sent[0]]) == want_a and sent[0].finish_reason == FinishReason.NONE
    assert _flatten([sent[1]]) == want_b and sent[1].finish_reason == FinishReason.LENGTH
    co.add(a[4])
    assert co.take() == [a[4]]


def test_echo_chunk_is_never_merged():
    first = _chunk(0, [7], prompt_token_ids=[1, 2, 3])
    rest = _stream(4)[1:]
    co = Coalescer()
    for c in [first, *rest]:
        co.add(c)
    sent = co.take()
    assert [c.token_ids for c in sent] == [[7], [1, 2, 3]]
    assert sent[0].prompt_token_ids == [1, 2, 3] and sent[1].finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("interval", [2, 4, 100])
def test_stream_interval(interval):
    stream = _stream(11)
    co = Coalescer(interval)
    sent = []
    for c in stream:
        co.add(c)
        sent += co.take()
    sizes = [len(c.token_ids) for c in sent]
    assert sizes[0] == 1  # the first token is never held (TTFT)
    assert all(s >= interval for s in sizes[1:-1])  # then at most every `interval` tokens
    assert sum(sizes) == 11 and sent[-1].finish_reason == FinishReason.LENGTH
    assert _flatten(sent) == _flatten(_stream(11))
    with pytest.raises(ValueError):
        Coalescer(0)
