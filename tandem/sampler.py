"""Turning the last-position logits of a batch into tokens (and logprobs).

Order, per request: logit_bias -> penalties -> min_tokens mask -> logprobs (of this processed
distribution, before temperature) -> greedy argmax, or temperature -> top-k -> top-p -> min-p
-> draw. A seeded request draws with a generator seeded from (seed, output index), so its
tokens do not depend on the batch it ran in, on preemption, or on which worker sampled it.
"""

from __future__ import annotations

import torch

from tandem.request import Logprob, Request

_SEED_STRIDE = 1_000_003


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    for i, req in enumerate(reqs):
        p = req.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if not p.needs_penalties:
            continue
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


def _apply_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
    for i, req in enumerate(reqs):
        if req.num_output_tokens < req.params.min_tokens:
            banned = set(req.params.stop_token_ids)
            if not req.params.ignore_eos:
                banned |= req.eos_token_ids
            if banned:
                logits[i, list(banned)] = float("-inf")


def _filter(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row; returns probabilities."""
    p = req.params
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1.0:
        sorted_probs, idx = probs.sort(descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, idx, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _draw(probs: torch.Tensor, req: Request, default_gen: torch.Generator | None) -> int:
    # exponential race (Gumbel-max): argmax(p / E) with E ~ Exp(1) draws from p
    if req.params.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(
            (req.params.seed * _SEED_STRIDE + req.num_output_tokens) & 0x7FFF_FFFF_FFFF_FFFF
        )
    else:
        gen = default_gen
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return int((probs / noise).argmax())


def sample(
    logits: torch.Tensor, reqs: list[Request], default_gen: torch.Generator | None = None
) -> tuple[list[int], list[Logprob | None]]:
    """logits [B, V] fp32 (modified in place) -> one token per request, and logprobs if asked."""
    _apply_penalties(logits, reqs)
    _apply_min_tokens(logits, reqs)
    want_logprobs = any(r.params.logprobs is not None for r in reqs)
    logprobs = logits.log_softmax(-1) if want_logprobs else None

    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    tokens = [0] * len(reqs)
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            tokens[i] = t
    for i, req in enumerate(reqs):
        if not req.params.greedy:
            tokens[i] = _draw(_filter(logits[i], req), req, default_gen)

    out: list[Logprob | None] = [None] * len(reqs)
    if logprobs is not None:
        for i, req in enumerate(reqs):
            k = req.params.logprobs
            if k is None:
                continue
            row = logprobs[i]
            top = []
            if k > 0:
                vals, ids = row.topk(k)
                top = list(zip(ids.tolist(), vals.tolist(), strict=True))
            out[i] = Logprob(tokens[i], float(row[tokens[i]]), top)
    return tokens, out
