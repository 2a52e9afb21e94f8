"""Structured outputs and tool calls end to end: the real `openai` client against real
processes on 127.0.0.1 (gateway, router, prefill and decode servers; SmolLM2 on CPU, greedy).

Two stacks, one at a time (the module-scoped `stack` fixture is parametrized indirectly, so
pytest runs every test of one mode before it starts the other):
- disaggregated: 1 prefill + 2 decode servers. Everything runs here; the last test kills the
  decode server under several constrained streams, which migrate to the other one (the
  replayed grammar matcher) and must end exactly as they do without the fault.
- aggregated: 1 decode server that prefills locally; a subset (parse, tool round trip).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import sys
import threading
from pathlib import Path

import openai
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).parents[1] / "faults")]
from fault_stack import MODEL_NAME, NUM_BLOCKS, FaultStack  # noqa: E402
from structured_models import CASES, WEATHER_TOOL, Case, GetWeather  # noqa: E402

from tandem.loader.default_model import resolve_model_dir  # noqa: E402
from tandem.records import SamplingParams, StructuredOutput  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MODES = {"disaggregated": (1, 2), "aggregated": (0, 1)}  # mode -> (num_prefill, num_decode)
BOTH = pytest.mark.parametrize("stack", list(MODES), indirect=True)
DISAGG = pytest.mark.parametrize("stack", ["disaggregated"], indirect=True)
MAX_TOKENS = 256  # every case ends in ~110 tokens; "length" means the grammar did not hold
NAMED = {"type": "function", "function": {"name": "get_weather"}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    num_prefill, num_decode = MODES[request.param]
    s = FaultStack(
        resolve_model_dir(None),
        tmp_path_factory.mktemp(f"structured_{request.param}"),
        num_prefill=num_prefill,
        num_decode=num_decode,
    )
    s.mode = request.param
    yield s
    s.stop()


def _client(stack: FaultStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=300)


def _ask(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _parse(client: openai.OpenAI, case: Case):
    return client.chat.completions.parse(
        model=MODEL_NAME,
        messages=_ask(case.prompt),
        response_format=case.model,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )


def _all(fn, items) -> list:
    """fn over items concurrently; each result or the exception it raised, in order."""

    def guarded(item):
        try:
            return fn(item)
        except Exception as e:  # collected: one report for every case, not the first only
            return e

    with cf.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(guarded, items))


def _parse_failures(cases: list[Case], completions: list) -> list[str]:
    failures = []
    for case, c in zip(cases, completions, strict=True):
        name = case.model.__name__
        if isinstance(c, Exception):
            failures.append(f"{name}: {type(c).__name__}: {c}")
            continue
        choice = c.choices[0]
        if not isinstance(choice.message.parsed, case.model):
            failures.append(
                f"{name}: parsed {choice.message.parsed!r} from {choice.message.content!r}"
            )
        elif choice.finish_reason != "stop" or c.model != MODEL_NAME:
            failures.append(f"{name}: finish_reason {choice.finish_reason!r}, model {c.model!r}")
    return failures


# -- response_format: pydantic models, json_object; guided_regex, guided_choice --------------------


@BOTH
def test_parse_returns_an_instance_of_every_model(stack):
    cases = CASES if stack.mode == "disaggregated" else CASES[::5]
    client = _client(stack)
    completions = _all(lambda case: _parse(client, case), cases)
    failures = _parse_failures(cases, completions)
    assert not failures, "\n".join(failures)


@DISAGG
def test_parse_output_equals_the_offline_llm_under_the_same_schema(stack, reference_llm):
    cases = CASES[1::5]
    client = _client(stack)
    got = [_parse(client, case).choices[0].message.content for case in cases]
    tokenizer = reference_llm.tokenizer
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                _ask(c.prompt), add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for c in cases
    ]
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=MAX_TOKENS,
            # the schema the client sends for the model (its strict form)
            structured=StructuredOutput(
                "json", json.dumps(openai.pydantic_function_tool(c.model)["function"]["parameters"])
            ),
        )
        for c in cases
    ]
    want = reference_llm.generate(prompts, params, use_tqdm=False)
    assert got == [w.outputs[0].text for w in want]


@DISAGG
def test_json_object_output_is_always_a_json_object(stack):
    prompts = [
        "Give a JSON object describing a cat with its name and age.",
        "Return a JSON object with the capital of France.",
        "Describe a person called Bob as a JSON object.",
    ]
    client = _client(stack)
    replies = _all(
        lambda p: client.chat.completions.create(
            model=MODEL_NAME,
            messages=_ask(p),
            response_format={"type": "json_object"},
            max_tokens=MAX_TOKENS,
            temperature=0,
        ),
        prompts,
    )
    for prompt, r in zip(prompts, replies, strict=True):
        assert not isinstance(r, Exception), (prompt, r)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert reason == "stop", (prompt, reason, text)
        assert isinstance(json.loads(text), dict), (prompt, text)


@DISAGG
def test_guided_regex_fullmatches_and_guided_choice_is_one_of_the_choices(stack):
    client = _client(stack)
    patterns = {
        "When did the first moon landing happen? Answer with a date as YYYY-MM-DD.": (
            r"\d{4}-\d{2}-\d{2}"
        ),
        "Give me a US phone number.": r"\(\d{3}\) \d{3}-\d{4}",
    }
    for prompt, pattern in patterns.items():
        r = client.chat.completions.create(
            model=MODEL_NAME,
            messages=_ask(prompt),
            max_tokens=32,
            temperature=0,
            extra_body={"guided_regex": pattern},
        )
        text = r.choices[0].message.content
        assert re.fullmatch(pattern, text), (pattern, text)
        assert r.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    for review in ("I love this movie!", "This was a waste of time.", "It is a film."):
        r = client.chat.completions.create(
            model=MODEL_NAME,
            messages=_ask(f"Classify the sentiment of: {review}"),
            max_tokens=8,
            temperature=0,
            extra_body={"guided_choice": choices},
        )
        assert r.choices[0].message.content in choices, (review, r.choices[0].message.content)


@DISAGG
def test_invalid_constraints_are_400_naming_the_field_and_serving_goes_on(stack):
    client = _client(stack)
    bad_schema = {
        "type": "json_schema",
        "json_schema": {"name": "bad", "schema": {"type": "objekt"}},
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=_ask("Hi"), max_tokens=8, response_format=bad_schema
        )
    assert err.value.status_code == 400 and err.value.param == "response_format", err.value
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=_ask("Hi"), max_tokens=8, extra_body={"guided_regex": "(ab"}
        )
    assert err.value.status_code == 400 and err.value.param == "guided_regex", err.value
    ok = _parse(client, CASES[0])
    assert isinstance(ok.choices[0].message.parsed, CASES[0].model)


# -- tools: forced tool choice, round trip, stream vs not ------------------------------------------


def _check_calls(message, tool_choice) -> None:
    """The reply is only tool calls whose arguments parse as the tool's schema."""
    calls = message.tool_calls or []
    assert calls and not message.content, message
    if tool_choice == NAMED:
        assert len(calls) == 1, calls
    assert len({c.id for c in calls}) == len(calls) and all(c.id for c in calls), calls
    for call in calls:
        assert call.type == "function" and call.function.name == "get_weather", call
        # parse() parsed the arguments against the strict tool's model; check it did
        assert isinstance(call.function.parsed_arguments, GetWeather), call
        assert GetWeather.model_validate_json(call.function.arguments)


@BOTH
@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
def test_tool_call_round_trip(stack, tool_choice):
    client = _client(stack)
    first = client.chat.completions.parse(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message, tool_choice)
    calls = choice.message.tool_calls
    messages = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in calls
            ],
        },
        *(
            {"role": "tool", "tool_call_id": c.id, "content": '{"temperature": 18, "sky": "clear"}'}
            for c in calls
        ),
    ]
    second = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=48,
        temperature=0,
    )
    answer = second.choices[0]
    assert answer.message.content and not answer.message.tool_calls, answer
    assert answer.finish_reason in ("stop", "length") and second.model == MODEL_NAME


def _streamed_calls(chunks) -> tuple[list[tuple[str, str, str]], str | None]:
    """The tool calls rebuilt from delta.tool_calls pieces: (id, name, arguments) by index."""
    calls: dict[int, list[str]] = {}
    finish_reason = None
    for chunk in chunks:
        assert chunk.model == MODEL_NAME
        for choice in chunk.choices:
            assert not choice.delta.content, choice.delta
            finish_reason = choice.finish_reason or finish_reason
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:  # a call's first piece names it
                    assert piece.id and piece.function.name and piece.type == "function", piece
                    calls[piece.index] = [piece.id, piece.function.name, ""]
                else:
                    assert not piece.id and not (piece.function and piece.function.name), piece
                if piece.function and piece.function.arguments:
                    calls[piece.index][2] += piece.function.arguments
    assert sorted(calls) == list(range(len(calls))), calls
    return [tuple(calls[i]) for i in sorted(calls)], finish_reason


@DISAGG
@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
def test_streamed_tool_calls_equal_the_non_streamed_ones(stack, tool_choice):
    client = _client(stack)
    kw = dict(
        model=MODEL_NAME,
        messages=WEATHER_QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    streamed, finish_reason = _streamed_calls(client.chat.completions.create(stream=True, **kw))
    assert finish_reason == whole.finish_reason == "tool_calls"
    # call ids are fresh per request; names and arguments are the greedy output
    assert [(name, args) for _, name, args in streamed] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    for _, _, args in streamed:
        GetWeather.model_validate_json(args)


# -- a decode server killed under constrained streams ---------------------------------------------

KILL_CASES = [c for c in CASES if c.model.__name__ in ("Company", "Recipe", "Team")]  # longest


def _run_streams(client: openai.OpenAI, on_chunk=None) -> list:
    """The kill cases and a named tool call, streamed concurrently with the client's stream
    helper (it accumulates content and tool-call pieces); their final completions."""

    def one(job):
        kw = dict(model=MODEL_NAME, max_tokens=MAX_TOKENS, temperature=0)
        if job == "tool":
            kw.update(messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=NAMED)
        else:
            kw.update(messages=_ask(job.prompt), response_format=job.model)
        with client.chat.completions.stream(**kw) as stream:
            for event in stream:
                if event.type == "chunk" and on_chunk is not None:
                    on_chunk()
            return stream.get_final_completion()

    return _all(one, [*KILL_CASES, "tool"])


def _outcome(completion) -> tuple:
    choice = completion.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content, calls, choice.finish_reason


@DISAGG
def test_decode_killed_mid_stream_constrained_streams_migrate_and_end_as_without_the_fault(stack):
    client = _client(stack)
    clean = _run_streams(client)
    assert not [c for c in clean if isinstance(c, Exception)], clean
    # streamed and not, the same greedy text
    whole = _all(lambda case: _parse(client, case), KILL_CASES)
    assert [w.choices[0].message.content for w in whole] == [
        c.choices[0].message.content for c in clean[: len(KILL_CASES)]
    ]
    lock, seen, killed = threading.Lock(), [0], {}

    def on_chunk():
        with lock:
            seen[0] += 1
            if killed or seen[0] < 4 * len(clean):  # a few chunks into every stream
                return
            running = {a: stack.stats(a).num_running for a in stack.decode}
            victim = max(stack.decode, key=running.__getitem__)
            killed.update(address=victim, num_running=running[victim], after_chunks=seen[0])
            stack.kill(victim)

    faulty = _run_streams(client, on_chunk)
    assert killed and killed["num_running"] > 0, f"no stream on the killed server: {killed}"
    print(f"decode server killed under constrained streams: {killed}")
    errors = [f for f in faulty if isinstance(f, Exception)]
    assert not errors, errors
    assert [_outcome(f) for f in faulty] == [_outcome(c) for c in clean]
    for case, f in zip(KILL_CASES, faulty, strict=False):
        assert isinstance(f.choices[0].message.parsed, case.model), f
    assert isinstance(
        faulty[-1].choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather
    )
    assert "role=decode" in stack.log("router")  # the router saw the decode server fail
    for address, s in stack.wait_idle().items():
        assert (s.num_running, s.num_waiting, s.num_active_handoffs) == (0, 0, 0), (address, s)
        assert s.num_free_blocks == s.num_total_blocks == NUM_BLOCKS, (address, s)
