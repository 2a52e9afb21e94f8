"""The offline API (LLM.generate / LLM.chat) on SmolLM2: templates, stop strings, ordering."""

from __future__ import annotations

from core_helpers import greedy

from tandem import SamplingParams


def test_chat_applies_the_models_template(smollm, tokenizer):
    conv = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit."},
    ]
    expected = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in expected
    (out,) = smollm.chat(conv, greedy(4), use_tqdm=False)
    assert out.prompt == expected
    assert out.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    # a list of conversations gives one output each, in order
    outs = smollm.chat([conv, conv[1:]], greedy(4), use_tqdm=False)
    assert [o.prompt for o in outs] == [
        expected,
        tokenizer.apply_chat_template(conv[1:], add_generation_prompt=True, tokenize=False),
    ]
    assert outs[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_stop_string_truncates_text_and_finishes_with_stop(smollm, prompt_ids):
    ids = prompt_ids[1]  # "def fibonacci(n):" continues with code lines
    free = smollm.generate([ids], greedy(24), use_tqdm=False)[0].outputs[0]
    assert "\n" in free.text
    stop = "\n"
    out = smollm.generate([ids], greedy(24, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert len(out.token_ids) < len(free.token_ids)
    assert free.token_ids[: len(out.token_ids)] == out.token_ids
    kept = smollm.generate(
        [ids], greedy(24, stop=[stop], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == out.text + stop and kept.finish_reason == "stop"
    bm = smollm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # the aborted request gave its blocks back


def test_outputs_come_back_in_prompt_order(smollm, prompt_ids):
    prompts = [prompt_ids[i] for i in (3, 0, 5, 0)]
    lens = [3, 9, 1, 5]
    params = [greedy(n) for n in lens]
    outs = smollm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == lens
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    # the same prompt twice in a batch: the same greedy tokens
    assert outs[3].outputs[0].token_ids == outs[1].outputs[0].token_ids[:5]


def test_string_prompts_and_text(smollm, tokenizer):
    (out,) = smollm.generate("The capital of France is", greedy(6), use_tqdm=False)
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == tokenizer.encode(out.prompt, add_special_tokens=False)
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids)
    assert "Paris" in out.outputs[0].text


def test_stop_token_ids_max_tokens_min_tokens_and_eos(smollm, prompt_ids):
    ids = prompt_ids[0]
    ref = smollm.generate([ids], greedy(12), use_tqdm=False)[0].outputs[0].token_ids
    # stop on the 4th generated token: it is included, finish_reason "stop"
    out = smollm.generate([ids], greedy(12, stop_token_ids=[ref[3]]), use_tqdm=False)[0]
    first = ref.index(ref[3])
    assert out.outputs[0].token_ids == ref[: first + 1]
    assert out.outputs[0].finish_reason == "stop"
    # min_tokens holds the stop token back until enough tokens are out
    out = smollm.generate([ids], greedy(12, stop_token_ids=[ref[0]], min_tokens=3), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(out.token_ids) >= 3 and out.token_ids[0] != ref[0]
    # EOS stops a request unless ignore_eos: force EOS with a logit bias
    eos = smollm.engine.model_cfg.eos_token_ids[0]
    bias = {eos: 100.0}
    out = smollm.generate(
        [ids], SamplingParams(temperature=0, max_tokens=8, logit_bias=bias), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = smollm.generate([ids], greedy(5, logit_bias=bias), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] * 5 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_across_batches(smollm, prompt_ids):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10, ignore_eos=True)
    alone = smollm.generate([prompt_ids[2]], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    outs = smollm.generate(
        [prompt_ids[0], prompt_ids[2], prompt_ids[4]], [others, p, others], use_tqdm=False
    )
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=8, max_tokens=10, ignore_eos=True)
    diff = smollm.generate([prompt_ids[2]], other_seed, use_tqdm=False)[0].outputs[0].token_ids
    assert diff != alone
