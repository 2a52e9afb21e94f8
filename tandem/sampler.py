"""Turning the last-position logits of a batch into tokens (and logprobs), on the logits' device.

Order, per request: the grammar's token mask (structured outputs, tandem/structured.py) ->
logit_bias -> penalties -> min_tokens mask -> logprobs (of this processed distribution,
before temperature) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw. A
seeded request draws with a generator seeded from (seed, output index), so its tokens do not
depend on the batch it ran in, on preemption, or on which worker sampled it.

The common case is batched: one argmax over the greedy rows, the filters as tensor ops over all
sampled rows (one sort when any row asks for top-k or top-p), one noise draw for the unseeded
rows, and a single device-to-host copy of the chosen tokens. Python loops run only over the rows
that need per-request work (logit_bias, penalties, min_tokens, seeds, logprobs).

That per-row work is where one request's settings are read: an exception there is raised as
RequestFailed naming the request, so that the engine fails that request alone (the servers
check every setting before admitting it; this is for what a check missed).
"""

from __future__ import annotations

import torch

from tandem.engine_records import RequestFailed
from tandem.records import Logprob
from tandem.request import Request
from tandem.structured import apply_bitmask

_SEED_STRIDE = 1_000_003


def _dev(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a stream sync (a plain torch.tensor(...,
    device=cuda) copies from pageable memory, which waits for the GPU: it would undo async
    scheduling)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _output_index(req: Request) -> int:
    """The output index of the token being sampled: under async scheduling the previous
    step's token may still be on its way to the host (num_pending_tokens)."""
    return req.num_output_tokens + req.num_pending_tokens


def _per_row(fn, logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    """fn(logits, i, reqs[i]) for each row; an exception names the row's request."""
    for i in rows:
        req = reqs[i]
        try:
            fn(logits, i, req)
        except Exception as e:
            raise RequestFailed(req.req_id, e) from e


def _penalize_row(logits: torch.Tensor, i: int, req: Request) -> None:
    p = req.params
    if p.logit_bias:
        ids = _dev(list(p.logit_bias), torch.long, logits.device)
        logits[i, ids] += _dev(list(p.logit_bias.values()), logits.dtype, logits.device)
    if not p.needs_penalties:
        return
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.token_ids)), device=logits.device)
        vals = logits[i, seen]
        logits[i, seen] = torch.where(
            vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and req.num_output_tokens:
        out = torch.tensor(req.output_token_ids, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].float()
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _mask_row(logits: torch.Tensor, i: int, req: Request) -> None:
    if _output_index(req) < req.params.min_tokens:
        banned = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            banned |= req.eos_token_ids
        if not banned:
            return
        ids = _dev(sorted(banned), torch.long, logits.device)
        if req.grammar is not None:  # a finished grammar allows only stop tokens: it wins
            kept = logits[i].index_fill(0, ids, float("-inf"))
            if bool(torch.isfinite(kept).any()):  # a host sync, for constrained rows only
                logits[i] = kept
            return
        logits[i, ids] = float("-inf")


def _filtered_probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p over rows [R, V] at once; returns probabilities.

    Per row this is: logits / T; keep the tokens whose logit is >= the k-th largest (ties
    kept); softmax; drop a token when the mass strictly before it (in descending order)
    already reaches top_p; drop tokens below min_p * max prob; renormalise.
    """
    dev, vocab = logits.device, logits.shape[-1]
    params = [r.params for r in reqs]
    temps = _dev([p.temperature for p in params], torch.float32, dev)
    logits = logits / temps[:, None]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    need_k = any(k < vocab for k in top_ks)
    need_p = any(p < 1.0 for p in top_ps)
    if need_k or need_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if need_k:
            ks = _dev(top_ks, torch.long, dev)
            kth = sorted_logits.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if need_p:
            sorted_probs = sorted_logits.softmax(-1)
            ps = _dev(top_ps, torch.float32, dev)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= ps[:, None]
            drop_unsorted = torch.zeros_like(drop).scatter_(1, order, drop)
            probs = probs.masked_fill(drop_unsorted, 0.0)
    else:
        probs = logits.softmax(-1)
    min_ps = [p.min_p for p in params]
    if any(m > 0 for m in min_ps):
        mp = _dev(min_ps, torch.float32, dev)
        probs = probs.masked_fill(probs < mp[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _noise(probs: torch.Tensor, reqs: list[Request], default_gen) -> torch.Tensor:
    """Exp(1) noise per row: rows of seeded requests from their own (seed, index) generator."""
    noise = torch.empty_like(probs)
    seeded = [i for i, r in enumerate(reqs) if r.params.seed is not None]
    if len(seeded) < len(reqs):
        noise.exponential_(generator=default_gen)
    _per_row(_seeded_noise_row, noise, reqs, seeded)
    return noise


def _seeded_noise_row(noise: torch.Tensor, i: int, req: Request) -> None:
    gen = torch.Generator(device=noise.device)
    gen.manual_seed((req.params.seed * _SEED_STRIDE + _output_index(req)) & 0x7FFF_FFFF_FFFF_FFFF)
    noise[i].exponential_(generator=gen)


def sample_on_device(
    logits: torch.Tensor,
    reqs: list[Request],
    default_gen: torch.Generator | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] fp32 (modified in place) -> the chosen tokens [B] int64 on the logits'
    device, and the log-probabilities [B, V] when any request asks for logprobs; no host sync
    (penalties, which read the request's tokens, are the caller's to keep in step).
    bitmask: the grammars' token mask of the batch (structured.grammar_bitmask), or None."""
    if bitmask is not None:  # constrained rows: before anything else reads the logits
        apply_bitmask(logits, bitmask)
    if all(r.plain_greedy for r in reqs):  # the common case: nothing per row
        return logits.argmax(-1), None
    # one pass over the batch sorts out the rows with per-request work (most have none)
    biased, min_rows, rand = [], [], []
    want_logprobs = False
    for i, req in enumerate(reqs):
        p = req.params
        if p.logit_bias or p.needs_penalties:
            biased.append(i)
        if p.min_tokens:
            min_rows.append(i)
        if not p.greedy:
            rand.append(i)
        if p.logprobs is not None:
            want_logprobs = True
    if biased:
        _per_row(_penalize_row, logits, reqs, biased)
    if min_rows:
        _per_row(_mask_row, logits, reqs, min_rows)
    logprobs = logits.log_softmax(-1) if want_logprobs else None

    tokens_t = logits.argmax(-1)  # greedy rows keep this
    if rand:
        rand_reqs = [reqs[i] for i in rand]
        rows = logits if len(rand) == len(reqs) else logits[_dev(rand, torch.long, logits.device)]
        probs = _filtered_probs(rows, rand_reqs)
        # exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) draws from p
        drawn = (probs / _noise(probs, rand_reqs, default_gen)).argmax(-1)
        if len(rand) == len(reqs):
            tokens_t = drawn
        else:
            tokens_t[_dev(rand, torch.long, logits.device)] = drawn
    return tokens_t, logprobs


def gather_logprobs(
    tokens: list[int], logprobs: torch.Tensor | None, reqs: list[Request]
) -> list[Logprob | None]:
    """The Logprob of each request that asked (sampled token + its top-k), else None."""
    out: list[Logprob | None] = [None] * len(reqs)
    if logprobs is None:
        return out
    for i, req in enumerate(reqs):
        k = req.params.logprobs
        if k is None:
            continue
        try:
            out[i] = _logprob_row(logprobs[i], tokens[i], k)
        except Exception as e:
            raise RequestFailed(req.req_id, e) from e
    return out


def _logprob_row(row: torch.Tensor, token: int, k: int) -> Logprob:
    top = []
    if k > 0:
        vals, ids = row.topk(k)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return Logprob(token, float(row[token]), top)


def sample(
    logits: torch.Tensor,
    reqs: list[Request],
    default_gen: torch.Generator | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[list[int], list[Logprob | None]]:
    """logits [B, V] fp32 (modified in place) -> one token per request, and logprobs if asked."""
    tokens_t, logprobs = sample_on_device(logits, reqs, default_gen, bitmask)
    tokens = tokens_t.tolist()  # the one host sync of a step
    return tokens, gather_logprobs(tokens, logprobs, reqs)
