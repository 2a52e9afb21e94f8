"""Structured outputs (tandem/structured.py) in the engine, on CPU.

A tiny random-weight Llama that uses SmolLM2's tokenizer (49,152 tokens): its logits know
nothing of JSON, so whatever well-formed output comes out, the token masks made it. Checked
against the references themselves: jsonschema validates the JSON, re.fullmatch the regexes,
xgrammar's own matcher every token. Both engine modes run: synchronous steps and async
scheduling (forced on here; it is CUDA's default), where a constrained row's matcher catches
up with the previous step's token before its mask is filled. Also: batches mixing constrained
and unconstrained rows, seeds, migrated requests (earlier outputs replayed into a fresh
matcher), preemption, aborts, refusals of bad specs, and no leaks.
"""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
from core_helpers import save_tiny_model

from tandem import LLM, SamplingParams
from tandem.loader.default_model import resolve_model_dir
from tandem.records import StructuredOutput
from tandem.structured import PARAM, GrammarBackend, choice_grammar
from tandem.validation import InvalidField, check_sampling

VOCAB = 49152  # SmolLM2's

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "tags", "ok"],
        "additionalProperties": False,
    },
]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ('say "hi"', "back\\slash", "two\nlines", "été", "no")
GRAMMAR = 'root ::= "(" [a-c]+ ")" | "x" [0-9]'
GRAMMAR_RE = r"\([a-c]+\)|x[0-9]"
PROMPTS = ["Give me JSON:", "Code:", "Answer: ", "The capital of France is"]


def _json(schema) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema))


def _p(structured=None, temperature=0.0, max_tokens=120, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, max_tokens=max_tokens, structured=structured, **kw
    )


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    save_tiny_model("llama", path, vocab_size=VOCAB, max_position_embeddings=1024)
    src = resolve_model_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return LLM(
        model=str(path), dtype="float32", device="cpu", kernel_backend="torch", num_blocks=256
    )


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def engine_mode(request, llm):
    """The engine in one mode for a test; back to synchronous steps after it."""
    llm.engine.async_scheduling = request.param
    yield request.param
    llm.engine.async_scheduling = False
    _no_leaks(llm)


@pytest.fixture
def async_mode(llm):
    """Async scheduling for a test (the harder path: matchers catch up with the step in
    flight); every test of both modes runs it too."""
    llm.engine.async_scheduling = True
    yield True
    llm.engine.async_scheduling = False
    _no_leaks(llm)


def _no_leaks(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st.num_free_blocks == st.num_total_blocks
    assert st.num_running == st.num_waiting == 0
    assert not llm.engine.requests and llm.engine._inflight is None


def _run(llm: LLM, prompts, params) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _check_tokens_with_xgrammar(llm: LLM, so: StructuredOutput, token_ids: list[int]) -> None:
    """xgrammar's own matcher accepts every output token, and ends with the last one."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(llm.engine.grammars.compile(so))
    for t in token_ids:
        assert matcher.accept_token(t), (t, token_ids)
    assert matcher.is_terminated()


def test_every_kind_greedy_and_seeded_matches_its_constraint(llm, engine_mode):
    """Synchronous steps sample greedily, async scheduling with seeds (both: every kind)."""
    cases = [_json(s) for s in SCHEMAS] + [
        StructuredOutput("regex", REGEX),
        StructuredOutput("json_object"),  # prompt 0: greedy closes it (keys are free-form)
        StructuredOutput("choice", choices=CHOICES),
        StructuredOutput("grammar", GRAMMAR),
    ]
    if engine_mode:  # all but json_object, whose free-form keys a random model may not close
        params = [_p(so, 1.0, seed=7 + i) for i, so in enumerate(cases) if so.kind != "json_object"]
    else:
        params = [_p(so) for so in cases]
    outs = _run(llm, [PROMPTS[i % 4] for i in range(len(params))], params)
    for p, out in zip(params, outs, strict=True):
        so, text = p.structured, out.text
        assert out.finish_reason == "stop", (so, text)
        _check_tokens_with_xgrammar(llm, so, out.token_ids)
        if so.kind == "json":
            jsonschema.validate(json.loads(text), json.loads(so.spec))
        elif so.kind == "json_object":
            assert isinstance(json.loads(text), dict)
        elif so.kind == "regex":
            assert re.fullmatch(REGEX, text), text
        elif so.kind == "choice":
            assert text in CHOICES
        else:
            assert re.fullmatch(GRAMMAR_RE, text), text


def test_unconstrained_rows_are_untouched_by_constrained_neighbours(llm, engine_mode):
    plain = [_p(max_tokens=24, ignore_eos=True), _p(None, 0.9, max_tokens=24, seed=5)]
    alone = _run(llm, [PROMPTS[3], PROMPTS[1]], plain)
    constrained = [_p(_json(SCHEMAS[0])), _p(StructuredOutput("regex", REGEX), 0.7, seed=1)]
    mixed = _run(llm, [PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[1]], [*constrained, *plain])
    assert [o.token_ids for o in mixed[2:]] == [o.token_ids for o in alone]
    # and the constrained rows equal their own runs alone (a seed gives the same tokens)
    for p, prompt, out in zip(constrained, [PROMPTS[2], PROMPTS[0]], mixed[:2], strict=True):
        assert _run(llm, [prompt], [p])[0].token_ids == out.token_ids


def test_a_large_batch_fills_its_masks_in_the_thread_pool_as_one_row_would(llm):
    """12 constrained rows (xgrammar's thread pool fills the masks) give each request's tokens
    of its run alone (one row, filled on the engine's thread)."""
    params = [_p(_json(SCHEMAS[i % len(SCHEMAS)]), 1.0, seed=40 + i) for i in range(12)]
    prompts = [PROMPTS[i % 4] for i in range(12)]
    together = _run(llm, prompts, params)
    for prompt, p, out in zip(prompts, params, together, strict=True):
        assert _run(llm, [prompt], [p])[0].token_ids == out.token_ids
    _no_leaks(llm)


def test_a_migrated_request_replays_its_outputs_into_a_fresh_matcher(llm, async_mode):
    so = _json(SCHEMAS[2])
    prompt = llm.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    full = _run(llm, [prompt], [_p(so)])[0].token_ids
    k = len(full) // 2
    engine = llm.engine
    req = engine.add_request("migrated", prompt + full[:k], _p(so), num_output_tokens=k)
    assert req.grammar.num_accepted == k
    while engine.has_unfinished():
        engine.step()
    assert req.output_token_ids == full
    # outputs the constraint never allows are refused at admission, nothing left behind
    bad = llm.tokenizer.encode("nope", add_special_tokens=False)
    with pytest.raises(InvalidField) as e:
        engine.add_request("bad-replay", prompt + bad, _p(so), num_output_tokens=len(bad))
    assert e.value.param == PARAM


def test_preemption_recomputes_constrained_requests_to_the_same_output(llm, async_mode):
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine

    so = [_json(SCHEMAS[i % 3]) for i in range(4)]
    prompts = [llm.tokenizer.encode(PROMPTS[i] * 3, add_special_tokens=False) for i in range(4)]
    want = [o.token_ids for o in _run(llm, prompts, [_p(s) for s in so])]
    small = LLMEngine(
        EngineConfig(
            model=str(llm.engine.model_dir),
            dtype="float32",
            device="cpu",
            kernel_backend="torch",
            num_blocks=9,
            block_size=8,
            async_scheduling=async_mode,
        )
    )
    small.grammars = llm.engine.grammars  # same tokenizer: skip loading it again
    reqs = [
        small.add_request(str(i), p, _p(s))
        for i, (p, s) in enumerate(zip(prompts, so, strict=True))
    ]
    while small.has_unfinished():
        small.step()
    assert small.num_preemptions > 0
    assert [r.output_token_ids for r in reqs] == want
    assert small.stats().num_free_blocks == small.stats().num_total_blocks


def test_a_finished_grammar_stops_the_request_under_ignore_eos_and_min_tokens(llm, engine_mode):
    so = StructuredOutput("choice", choices=("yes", "no"))
    outs = _run(llm, PROMPTS[:2], [_p(so, ignore_eos=True), _p(so, 0.8, seed=3, min_tokens=10)])
    for out in outs:
        assert out.finish_reason == "stop" and out.text in ("yes", "no")
        assert len(out.token_ids) < 10  # the grammar's end wins over min_tokens


def test_aborting_constrained_requests_leaves_nothing(llm, async_mode):
    engine = llm.engine
    prompt = llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    for i in range(3):
        engine.add_request(f"abort-{i}", prompt, _p(_json(SCHEMAS[0]), max_tokens=200))
    for _ in range(3):
        engine.step()
    for i in range(3):
        assert engine.abort(f"abort-{i}")
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize(
    "so, words",
    [
        (StructuredOutput("json", '{"type": "bogus"}'), "invalid JSON schema"),
        (StructuredOutput("json", "{not json"), "invalid JSON schema"),
        (StructuredOutput("regex", "a(b"), "parenthesis"),
        (StructuredOutput("grammar", "root ::= undefined_rule"), "undefined_rule"),
        (StructuredOutput("structural_tag", '{"type": "x"}'), "invalid structural_tag"),
    ],
)
def test_bad_specs_are_refused_with_invalid_field(llm, so, words):
    with pytest.raises(InvalidField) as e:
        llm.engine.add_request("bad-spec", [5, 6, 7], _p(so))
    assert e.value.param == PARAM and words in e.value.message, e.value.message
    assert "/project/" not in e.value.message  # xgrammar's source locations stay out
    assert not llm.engine.requests


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(structured=StructuredOutput("yaml", "x")), PARAM),
        (dict(structured=StructuredOutput("json", "")), PARAM),
        (dict(structured=StructuredOutput("regex", "a" * (64 * 1024 + 1))), PARAM),
        (dict(structured=StructuredOutput("choice", choices=())), PARAM),
        (dict(structured=StructuredOutput("choice", choices=("a", ""))), PARAM),
        (dict(structured=StructuredOutput("choice", choices=("a",) * 1025)), PARAM),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(n=0), "n"),
        (dict(n=3, best_of=2), "best_of"),
    ],
)
def test_check_sampling_bounds(fields, param):
    with pytest.raises(InvalidField) as e:
        SamplingParams(**fields)
    assert e.value.param == param
    check_sampling(SamplingParams(prompt_logprobs=20, n=2, best_of=3, check=False))


def test_the_rules_know_every_kind_the_records_name():
    from tandem import records, validation

    assert validation.STRUCTURED_KINDS == records.STRUCTURED_KINDS


def test_a_matcher_rolls_back_tokens_a_failed_step_lost(llm):
    """Under async scheduling a matcher takes the step in flight's token from its host copy;
    when that step fails (tandem/recovery.py) the token never reaches the request, which
    samples that position again: the matcher forgets the lost token first."""
    from core_helpers import make_request

    so = StructuredOutput("regex", "[a-z]{3}-[0-9]")
    req = make_request("r", [5, 6, 7], structured=so)
    state = llm.engine.grammars.new_state(so)
    tok = llm.tokenizer
    abc, xyz, dash, one = (tok.convert_tokens_to_ids(t) for t in ("abc", "xyz", "-", "1"))
    assert not state.advance(req, pending_token=abc)  # taken from the step in flight: lost
    # the position sampled again (without the rollback "abcxyz" would break the regex)
    assert not state.advance(req, pending_token=xyz)
    req.token_ids += [xyz, dash, one]
    assert not state.advance(req) and state.num_accepted == 3
    req.token_ids.append(2)
    assert state.advance(req)  # EOS ends it


def test_choice_grammar_escapes_literals():
    assert choice_grammar(['a"b', "c\\d", "e\nf"]) == r'root ::= "a\"b" | "c\\d" | "e\nf"'


def test_the_compile_cache_returns_the_same_grammar(llm):
    backend: GrammarBackend = llm.engine.grammars
    so = StructuredOutput("regex", "[a-z]+")
    assert backend.compile(so) is backend.compile(StructuredOutput("regex", "[a-z]+"))
    # a structural tag (free text, then a tool call's JSON after its trigger) compiles too
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<tool>"],
            "tags": [
                {
                    "begin": "<tool>",
                    "content": {"type": "json_schema", "json_schema": SCHEMAS[0]},
                    "end": "</tool>",
                }
            ],
        },
    }
    assert backend.compile(StructuredOutput("structural_tag", json.dumps(tag))) is not None
