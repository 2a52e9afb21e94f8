"""The sampler on hand-made logits: seeds, filters, penalties, biases, min_tokens, logprobs."""

from __future__ import annotations

import pytest
import torch

from tandem.records import SamplingParams
from tandem.request import Request
from tandem.sampler import sample

V = 50
EOS = 7


def req(rid: str = "r", prompt=(1, 2, 3), output=(), **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    r.max_total_tokens = 1000
    r.token_ids += list(output)
    return r


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 2


def draw(logits_row: torch.Tensor, r: Request) -> int:
    return sample(logits_row[None].clone(), [r])[0][0]


def test_same_seed_same_tokens_whatever_the_batch():
    row = logits_for(1)[0]
    params = dict(temperature=1.0, seed=1234)

    def run_alone() -> list[int]:
        r = req(**params)
        toks = []
        for _ in range(20):
            t = draw(row, r)
            toks.append(t)
            r.token_ids.append(t)
        return toks

    alone = run_alone()
    assert alone == run_alone()
    # the same request inside batches of different sizes and positions, other rows unseeded
    for batch, pos in ((3, 0), (5, 4), (8, 2)):
        r = req(**params)
        others = [req(f"o{i}", temperature=1.0) for i in range(batch - 1)]
        gen = torch.Generator().manual_seed(99 + batch)
        toks = []
        for step in range(20):
            reqs = others[:pos] + [r] + others[pos:]
            logits = logits_for(batch, seed=step + 10)
            logits[pos] = row
            out, _ = sample(logits, reqs, gen)
            toks.append(out[pos])
            r.token_ids.append(out[pos])
            for o, t in zip(others, out[:pos] + out[pos + 1 :], strict=True):
                o.token_ids.append(t)
        assert toks == alone, (batch, pos)


def test_different_seeds_differ():
    row = logits_for(1)[0] * 0.1  # flat: plenty of randomness
    runs = []
    for seed in (1, 2, 3):
        r = req(temperature=1.0, seed=seed)
        toks = []
        for _ in range(16):
            toks.append(draw(row, r))
            r.token_ids.append(toks[-1])
        runs.append(toks)
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def test_seeded_draws_follow_the_distribution():
    row = torch.log(torch.tensor([0.6, 0.3, 0.1] + [1e-9] * (V - 3)))
    counts = torch.zeros(V)
    for seed in range(3000):
        counts[draw(row, req(temperature=1.0, seed=seed))] += 1
    freq = counts[:3] / counts.sum()
    assert counts[3:].sum() == 0
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04), freq


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=1, seed=5),
        dict(temperature=5.0, top_k=1),
        dict(temperature=1.0, top_p=1e-6, seed=5),
        dict(temperature=3.0, top_p=1e-6),
        dict(temperature=1.0, min_p=0.999, seed=5),
    ],
)
def test_filters_that_keep_one_token_equal_greedy(params):
    logits = logits_for(6, seed=3)
    expected = logits.argmax(-1).tolist()
    for i in range(6):
        assert draw(logits[i], req(**params)) == expected[i]


def test_top_k_and_min_p_restrict_support():
    row = logits_for(1, seed=4)[0]
    top3 = set(row.topk(3).indices.tolist())
    seen = {draw(row, req(temperature=2.0, top_k=3, seed=s)) for s in range(300)}
    assert seen <= top3 and len(seen) > 1
    probs = row.softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    seen = {draw(row, req(temperature=1.0, min_p=0.2, seed=s)) for s in range(300)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_the_smallest_nucleus():
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-12] * (V - 4)))
    seen = {draw(row, req(temperature=1.0, top_p=0.7, seed=s)) for s in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    seen = {draw(row, req(temperature=1.0, top_p=0.9, seed=s)) for s in range(300)}
    assert seen == {0, 1, 2}


def test_logit_bias_forces_and_bans():
    logits = logits_for(4, seed=5)
    for i in range(4):
        assert draw(logits[i], req(temperature=0.0, logit_bias={13: 100.0})) == 13
        assert draw(logits[i], req(temperature=1.0, seed=i, logit_bias={13: 100.0})) == 13
        best = int(logits[i].argmax())
        banned = draw(logits[i], req(temperature=0.0, logit_bias={best: -100.0}))
        assert banned != best
        assert banned == int(logits[i].topk(2).indices[1])


def test_penalties_push_seen_tokens_down():
    row = torch.zeros(V)
    row[10], row[11], row[12] = 3.0, 2.9, -1.0
    lp = dict(temperature=0.0, logprobs=0)

    def logprob_of(r: Request, tok: int) -> float:
        _, out = sample(row[None].clone(), [r])
        return out[0].logprob if out[0].token_id == tok else float("nan")

    # no penalty: 10 wins
    assert draw(row, req(temperature=0.0, output=(10, 10))) == 10
    # frequency: two uses of 10 cost 2 * 0.2; 11 wins
    assert draw(row, req(temperature=0.0, output=(10, 10), frequency_penalty=0.2)) == 11
    # presence: one flat cost per seen token
    assert draw(row, req(temperature=0.0, output=(10,), presence_penalty=0.5)) == 11
    # presence/frequency look only at generated tokens, never the prompt
    assert draw(row, req(temperature=0.0, prompt=(10, 10), presence_penalty=0.5)) == 10
    # repetition (HF): divides positive logits, multiplies negative ones, prompt included
    assert draw(row, req(temperature=0.0, prompt=(10,), repetition_penalty=1.2)) == 11
    r_neg = req(prompt=(12,), repetition_penalty=2.0, **lp)
    r_base = req(prompt=(1,), **lp)
    out_neg = sample(row[None].clone(), [r_neg])[1][0]
    out_base = sample(row[None].clone(), [r_base])[1][0]
    full = row.clone()
    full[12] = -2.0
    assert out_neg.logprob == pytest.approx(float(full.log_softmax(-1)[10]), abs=1e-6)
    assert out_base.logprob == pytest.approx(float(row.log_softmax(-1)[10]), abs=1e-6)
    # a negative presence penalty (encouragement) works the other way round
    assert draw(row, req(temperature=0.0, output=(11,), presence_penalty=-0.5)) == 11
    assert logprob_of(req(output=(10,), frequency_penalty=0.05, **lp), 10) < logprob_of(
        req(**lp), 10
    )


def test_min_tokens_suppresses_eos_and_stop_tokens():
    row = torch.zeros(V)
    row[EOS], row[20], row[3] = 10.0, 9.0, 1.0
    assert draw(row, req(temperature=0.0)) == EOS
    assert draw(row, req(temperature=0.0, min_tokens=2, output=(3,))) == 20
    assert draw(row, req(temperature=0.0, min_tokens=2, output=(3, 3))) == EOS
    stop = req(temperature=0.0, min_tokens=1, stop_token_ids=[20])
    assert draw(row, stop) == 3
    # ignore_eos: EOS is an ordinary token, min_tokens does not mask it
    assert draw(row, req(temperature=0.0, min_tokens=3, ignore_eos=True)) == EOS
    for s in range(50):
        assert draw(row, req(temperature=1.0, seed=s, min_tokens=1)) != EOS


def test_logprobs_match_log_softmax_and_are_sorted():
    logits = logits_for(3, seed=8)
    reqs = [
        req("a", temperature=0.0, logprobs=5),
        req("b", temperature=1.0, seed=3, logprobs=3),
        req("c", temperature=0.0),
    ]
    tokens, out = sample(logits.clone(), reqs)
    ref = logits.log_softmax(-1)
    for i, k in ((0, 5), (1, 3)):
        lp = out[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        assert [t for t, _ in lp.top] == ref[i].topk(k).indices.tolist()
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert vals == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-5)
    assert out[0].top[0][0] == tokens[0]  # greedy: the sampled token is the best one
    assert out[2] is None


def test_logprobs_zero_gives_only_the_sampled_token():
    _, out = sample(logits_for(1), [req(temperature=0.0, logprobs=0)])
    assert out[0].top == [] and out[0].logprob <= 0


def test_invalid_params_are_rejected():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(min_p=1.5),
        dict(max_tokens=0),
        dict(min_tokens=5, max_tokens=2),
        dict(presence_penalty=3),
        dict(logprobs=-1),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
