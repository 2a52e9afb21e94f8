"""The one set of request rules (tandem/validation.py): every out-of-range field is refused
with its name, NaN and infinities included, by SamplingParams and by the token-level check."""

from __future__ import annotations

import math

import pytest

from tandem.records import SamplingParams
from tandem.validation import (
    MAX_LOGIT_BIAS,
    MAX_STOP_TOKEN_IDS,
    InvalidField,
    RequestLimits,
    check_prompt,
    check_sampling,
)

LIMITS = RequestLimits(vocab_size=100, max_model_len=64)
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=NAN), "temperature"),
        (dict(temperature=INF), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=NAN), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=NAN), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-INF), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=NAN), "repetition_penalty"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(logprobs=21), "top_logprobs"),
        (dict(logprobs=-1), "top_logprobs"),
        (dict(seed=1 << 63), "seed"),
        (dict(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
        (dict(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
        (dict(logit_bias={3: NAN}), "logit_bias"),
        (dict(logit_bias={3: 101.0}), "logit_bias"),
        (dict(stop=["x"] * 17), "stop"),
    ],
)
def test_an_out_of_range_setting_is_refused_by_name(fields, param):
    with pytest.raises(InvalidField) as e:
        SamplingParams(**fields)
    assert e.value.param == param
    unchecked = SamplingParams(**fields, check=False)  # what the servers convert, then check
    with pytest.raises(InvalidField) as e:
        check_sampling(unchecked)
    assert e.value.param == param


def test_the_wire_top_logprobs_is_checked_even_when_logprobs_is_off():
    with pytest.raises(InvalidField, match="top_logprobs must be in"):
        check_sampling(SamplingParams(), top_logprobs=10**6)
    check_sampling(SamplingParams(), top_logprobs=20)


@pytest.mark.parametrize(
    ("prompt", "fields", "num_out", "param", "context_length"),
    [
        ([], {}, 0, "prompt", False),
        ([1, -1], {}, 0, "prompt", False),
        ([1, 100], {}, 0, "prompt", False),
        ([1, 2], dict(stop_token_ids=[100]), 0, "stop_token_ids", False),
        ([1, 2], dict(stop_token_ids=[-3]), 0, "stop_token_ids", False),
        ([1, 2], dict(logit_bias={10**6: 1.0}), 0, "logit_bias", False),
        ([1, 2], {}, 2, "num_output_tokens", False),
        ([1, 2], {}, -1, "num_output_tokens", False),
        ([1] * 64, dict(max_tokens=None), 0, "prompt", True),
        ([1] * 60, dict(max_tokens=5), 0, "max_tokens", True),
    ],
)
def test_a_bad_prompt_or_token_id_is_refused_by_name(
    prompt, fields, num_out, param, context_length
):
    params = SamplingParams(**fields)
    with pytest.raises(InvalidField) as e:
        check_prompt(prompt, params, LIMITS, num_output_tokens=num_out)
    assert (e.value.param, e.value.context_length) == (param, context_length)


def test_max_tokens_counts_the_earlier_outputs_of_a_migrated_request():
    # 58 prompt tokens + 2 earlier outputs; max_tokens 6 counts those 2: 64 in all, fits
    check_prompt([1] * 60, SamplingParams(max_tokens=6), LIMITS, num_output_tokens=2)
    with pytest.raises(InvalidField, match="maximum context length"):
        check_prompt([1] * 60, SamplingParams(max_tokens=7), LIMITS, num_output_tokens=2)
    # the offline API caps max_tokens at the context instead of refusing it
    check_prompt([1] * 60, SamplingParams(max_tokens=50), LIMITS, cap_max_tokens=True)


def test_valid_settings_pass():
    params = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=0, min_p=0.1, seed=-(1 << 63), presence_penalty=-2,
        frequency_penalty=2, repetition_penalty=2, logit_bias={99: -100.0}, stop_token_ids=[0],
        min_tokens=3, max_tokens=3, logprobs=20,
    )  # fmt: skip
    check_prompt([0, 99], params, LIMITS)
