"""Bad requests are refused at admission with a clear error, and nothing is left behind."""

from __future__ import annotations

import pytest

from tandem import SamplingParams


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "the prompt is empty"),
        ([1, 2, 10**6], SamplingParams(), r"token ids must be in \[0, "),
        ([1, 2, -1], SamplingParams(), r"token ids must be in \[0, "),
        ([1, 2, 3], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        ([1, 2, 3], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
        ([1, 2, 3], SamplingParams(logprobs=10**6, check=False), "top_logprobs"),
        ([1, 2, 3], SamplingParams(top_k=-7, check=False), "top_k"),
        ([1] * 9000, SamplingParams(), "maximum context length"),
    ],
)
def test_bad_request_is_refused_and_leaks_nothing(smollm, prompt, params, message):
    engine = smollm.engine
    free_before = engine.block_manager.num_free_blocks
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert "bad" not in engine.requests
    assert engine.block_manager.num_free_blocks == free_before
    assert not engine.has_unfinished()


def test_stop_string_on_the_last_step_finishes_with_stop(smollm):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    text = smollm.generate(["The capital of France is"], greedy, use_tqdm=False)[0].outputs[0].text
    last_word = text.split()[-1]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=[last_word])
    out = smollm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert last_word not in out.text and text.startswith(out.text)
