"""Metric math on synthetic records: the definitions of vLLM's `bench serve`."""

import math

import numpy as np
import pytest

from bench.client import _StreamState
from bench.metrics import (
    RequestRecord,
    format_summary,
    is_good,
    merge_results,
    parse_goodput,
    parse_percentiles,
    summarize,
)
from bench.runner import arrival_times


def record(i, send, ttft, itl, out, prompt=10, success=True):
    r = RequestRecord(i, prompt, out, send_time=send, success=success)
    r.ttft, r.itl, r.output_tokens, r.prompt_tokens = ttft, list(itl), out, prompt
    r.latency = ttft + sum(itl)
    r.num_chunks = len(itl) + 1
    return r


def test_tpot_ttft_e2el_and_pooled_itl():
    a = record(0, 0.0, 0.1, [0.01, 0.02, 0.03], 4)  # e2el 0.16, tpot 0.06 / 3 = 0.02
    b = record(1, 0.5, 0.3, [0.05], 2)  # e2el 0.35, tpot 0.05
    s = summarize([a, b], percentiles=[50, 90])
    assert s["completed"] == 2 and s["failed"] == 0
    assert s["mean_ttft_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx((20 + 50) / 2)
    assert s["mean_e2el_ms"] == pytest.approx((160 + 350) / 2)
    # ITL pools every gap of every request: 10, 20, 30, 50 ms
    assert s["mean_itl_ms"] == pytest.approx(27.5)
    assert s["median_itl_ms"] == pytest.approx(25)
    assert s["p90_itl_ms"] == pytest.approx(np.percentile([10, 20, 30, 50], 90))
    # duration: first send (0.0) -> last finish (0.5 + 0.35)
    assert s["duration_s"] == pytest.approx(0.85)
    assert s["output_throughput"] == pytest.approx(6 / 0.85)
    assert s["total_token_throughput"] == pytest.approx(26 / 0.85)
    assert s["request_throughput"] == pytest.approx(2 / 0.85)
    assert s["mean_tokens_per_chunk"] == pytest.approx(1.0)
    assert s["prefix_cache_hit_rate"] == 0.0


def test_percentiles_are_numpy_linear():
    ttfts = [0.001 * k for k in range(1, 101)]
    rs = [record(i, 0.0, t, [], 1) for i, t in enumerate(ttfts)]
    s = summarize(rs, percentiles=[50, 90, 99, 99.9])
    for p in (50, 90, 99, 99.9):
        assert s[f"p{p:g}_ttft_ms"] == pytest.approx(np.percentile(np.array(ttfts) * 1000, p))
    assert s["median_ttft_ms"] == pytest.approx(50.5)
    # one output token: no TPOT at all (and no ITL)
    assert s["mean_tpot_ms"] == 0.0 and s["mean_itl_ms"] == 0.0


def test_prefix_cache_hit_rate_from_usage():
    a, b = record(0, 0.0, 0.1, [0.01], 2, prompt=100), record(1, 0.0, 0.1, [0.01], 2, prompt=300)
    a.cached_tokens, b.cached_tokens = 0, 288
    s = summarize([a, b])
    assert s["cached_tokens"] == 288
    assert s["prefix_cache_hit_rate"] == pytest.approx(288 / 400)
    assert "Prefix cache hit rate" in format_summary(s, [99])


def test_failed_requests_are_counted_not_measured():
    good = record(0, 0.0, 0.1, [0.01], 2)
    bad = record(1, 0.0, 9.0, [9.0], 2, success=False)
    s = summarize([good, bad])
    assert (s["completed"], s["failed"]) == (1, 1)
    assert s["mean_ttft_ms"] == pytest.approx(100)
    assert s["total_output_tokens"] == 2


def test_goodput_needs_every_slo():
    fast = record(0, 0.0, 0.1, [0.01] * 9, 10)  # ttft 100 ms, tpot 10 ms
    slow_first = record(1, 0.0, 0.5, [0.01] * 9, 10)  # ttft 500 ms
    slow_tokens = record(2, 0.0, 0.1, [0.05] * 9, 10)  # tpot 50 ms
    single = record(3, 0.0, 0.2, [], 1)  # no tpot: counts as 0
    slos = parse_goodput(["ttft:400", "tpot:40"])
    assert slos == {"ttft": 400.0, "tpot": 40.0}
    assert [is_good(r, slos) for r in (fast, slow_first, slow_tokens, single)] == [
        True, False, False, True,
    ]  # fmt: skip
    s = summarize([fast, slow_first, slow_tokens, single], slos=slos)
    assert s["good_requests"] == 2 and s["slo_attainment"] == 0.5
    assert s["request_goodput"] == pytest.approx(2 / s["duration_s"])
    assert "Request goodput" in format_summary(s, [50, 99])


@pytest.mark.parametrize("spec", ["ttft", "itl:10", "ttft:x", "ttft:0", "tpot:-1"])
def test_goodput_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        parse_goodput([spec])


def test_percentile_flag():
    assert parse_percentiles("50,90,99.9") == [50, 90, 99.9]
    for bad in ("", "0", "101", "50,abc"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


def _events(state, events, now):
    for e in events:
        state.event(e, now)


def test_itl_is_per_chunk_when_a_chunk_holds_several_tokens():
    """3 chunks carry 5 tokens: 2 ITL gaps (vLLM's per-chunk rule), TPOT over 4 tokens."""
    r = RequestRecord(0, 8, 5)
    st = _StreamState(r, "completions", t_send=10.0)
    chunk = b'data: {"choices":[{"index":0,"text":"%s","finish_reason":%s}],"usage":null}'
    _events(st, [chunk % (b" a b", b"null")], 10.2)  # TTFT 0.2 s
    _events(st, [chunk % (b" c", b"null")], 10.3)
    _events(st, [chunk % (b"", b'"length"')], 10.6)  # the finish chunk ends it
    usage = (
        b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":5,"total_tokens":13}}'
    )
    _events(st, [usage, b"data: [DONE]"], 10.6)
    assert st.done
    assert r.ttft == pytest.approx(0.2)
    assert r.itl == pytest.approx([0.1, 0.3])
    assert (r.num_chunks, r.output_tokens, r.prompt_tokens) == (3, 5, 8)
    assert r.finish_reason == "length"
    r.latency, r.success = st.t_last - 10.0, True
    assert r.tpot() == pytest.approx(0.4 / 4)
    s = summarize([r])
    assert s["mean_tokens_per_chunk"] == pytest.approx(5 / 3)
    assert s["mean_itl_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(100)


def test_chat_role_chunk_is_not_the_first_token():
    r = RequestRecord(0, 8, 2)
    st = _StreamState(r, "chat", t_send=0.0)
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    tok = b'data: {"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}'
    _events(st, [role], 0.05)
    _events(st, [tok], 0.1)
    _events(st, [tok], 0.15)
    assert r.ttft == pytest.approx(0.1) and r.itl == pytest.approx([0.05])


def test_arrivals_inf_poisson_and_seeded():
    assert not arrival_times(5, math.inf).any()
    a = arrival_times(20000, rate=10.0, seed=1)
    assert a[0] == 0 and np.all(np.diff(a) >= 0)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() == pytest.approx(0.1, rel=0.05)  # exponential: std == mean
    assert np.array_equal(a, arrival_times(20000, rate=10.0, seed=1))
    steady = np.diff(arrival_times(20000, rate=10.0, burstiness=4.0, seed=1))
    assert steady.mean() == pytest.approx(0.1, rel=0.03)
    assert steady.std() == pytest.approx(0.05, rel=0.05)  # gamma: std = mean / sqrt(shape)


def test_merge_results_puts_clients_on_one_clock():
    def result(t0, records, peak, cpu):
        return {
            "date": "2026-12-03T21:00:00+00:00",
            "t0_unix": t0,
            "settings": {"seed": t0},
            "summary": {"max_concurrency_reached": peak, "client_cpu_s": cpu},
            "requests": [
                {**{f: getattr(r, f) for f in RequestRecord.__slots__}, "tpot": r.tpot()}
                for r in records
            ],
        }

    a = result(100.0, [record(0, 0.0, 0.1, [0.01], 2), record(1, 0.0, 0.2, [0.02], 2)], 2, 1.5)
    b = result(100.5, [record(0, 0.0, 0.1, [0.03, 0.03], 3)], 1, 0.5)
    m = merge_results([a, b])
    assert m["t0_unix"] == 100.0 and m["settings"] == [{"seed": 100.0}, {"seed": 100.5}]
    assert [(r["client"], r["index"], r["send_time"]) for r in m["requests"]] == [
        (0, 0, 0.0), (0, 1, 0.0), (1, 0, 0.5),
    ]  # fmt: skip
    s = m["summary"]
    assert (s["completed"], s["total_output_tokens"], s["num_clients"]) == (3, 7, 2)
    assert s["max_concurrency_reached"] == 3 and s["client_cpu_s"] == 2.0
    assert math.isclose(s["duration_s"], 0.5 + 0.1 + 0.06)  # first send -> b's last token
    assert math.isclose(s["mean_itl_ms"], 1000 * (0.01 + 0.02 + 0.03 + 0.03) / 4)
