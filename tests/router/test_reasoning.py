"""Reasoning parsers over streamed output: known splits of Qwen3 and DeepSeek-R1 outputs, the
same split however the text is cut, and no partial tag ever shown."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.reasoning import REASONING_PARSERS, make_reasoning_parser

# Prompts as the models' chat templates end them
QWEN3_THINKING = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NO_THINK = QWEN3_THINKING + "<think>\n\n</think>\n\n"  # enable_thinking=False
QWEN3_OPENED = QWEN3_THINKING + "<think>\n"  # thinking-only models open it in the prompt
R1_PROMPT = "<｜User｜>hi<｜Assistant｜><think>\n"


def run(name, prompt, pieces):
    parser = make_reasoning_parser(name, prompt)
    reasoning = content = ""
    for piece in [*pieces, None]:
        r, c = parser.feed(piece) if piece is not None else parser.flush()
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def splits(text):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


CASES = [
    # (parser, prompt, output, reasoning, content)
    ("qwen3", QWEN3_THINKING, "<think>\nLet me add.\n</think>\n\n2", "\nLet me add.\n", "\n\n2"),
    ("qwen3", QWEN3_THINKING, "\n<think>a < b</thin</think>ok", "a < b</thin", "ok"),
    ("qwen3", QWEN3_NO_THINK, "Just the answer.", "", "Just the answer."),
    ("qwen3", QWEN3_THINKING, "No tags at all", "", "No tags at all"),
    ("qwen3", QWEN3_THINKING, "x </think> y", "", "x </think> y"),  # never opened: content
    ("qwen3", QWEN3_THINKING, "<think>cut short", "cut short", ""),
    ("qwen3", QWEN3_THINKING, "<thin", "", "<thin"),
    ("qwen3", QWEN3_OPENED, "reasoning here\n</think>\n\nanswer", "reasoning here\n", "\n\nanswer"),
    ("qwen3", QWEN3_OPENED, "only thoughts </thi", "only thoughts </thi", ""),
    (
        "deepseek_r1",
        R1_PROMPT,
        "Okay, so.\n</think>\n\nThe answer is 4.",
        "Okay, so.\n",
        "\n\nThe answer is 4.",
    ),
    ("deepseek_r1", R1_PROMPT, "<think>\nhmm</think>done", "\nhmm", "done"),
    ("deepseek_r1", R1_PROMPT, "never closes <think>", "never closes <think>", ""),
    ("deepseek_r1", R1_PROMPT, "", "", ""),
    ("deepseek_r1", R1_PROMPT, "</think>", "", ""),
    ("deepseek_r1", R1_PROMPT, "a</think>b</think>c", "a", "b</think>c"),
]


@pytest.mark.parametrize(("name", "prompt", "output", "reasoning", "content"), CASES)
def test_known_outputs_in_every_split(name, prompt, output, reasoning, content):
    for pieces in splits(output):
        assert run(name, prompt, pieces) == (reasoning, content), pieces


def test_tags_are_held_back_not_shown():
    parser = make_reasoning_parser("qwen3", QWEN3_THINKING)
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>abc</th") == ("abc", "")
    assert parser.feed("ink>") == ("", "")
    assert parser.feed(" hi") == ("", " hi")
    assert parser.flush() == ("", "")


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="qwen3.*deepseek_r1"):
        make_reasoning_parser("o1", "")
    assert REASONING_PARSERS == ("qwen3", "deepseek_r1")


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(REASONING_PARSERS),
    prompt=st.sampled_from([QWEN3_THINKING, QWEN3_NO_THINK, QWEN3_OPENED, R1_PROMPT]),
    parts=st.lists(
        st.sampled_from(["<think>", "</think>", "<", "/", ">", "think", " ", "\n", "x"]),
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 100), max_size=8),
)
def test_any_text_any_chunking_matches_one_feed(name, prompt, parts, cuts):
    output = "".join(parts)
    bounds = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    reasoning, content = run(name, prompt, pieces)
    assert (reasoning, content) == run(name, prompt, [output])
    # Nothing is lost but the tags that switch phases (and whitespace before an opening tag).
    assert rebuilds(output, reasoning, content)


def rebuilds(output, reasoning, content):
    """output == [whitespace <think>] reasoning [</think>] content, the tags where they were."""
    for head in ("<think>", ""):
        for mid in ("</think>", ""):
            tail = head + reasoning + mid + content
            lead = output[: len(output) - len(tail)]
            if output.endswith(tail) and (lead == "" or (head and not lead.strip())):
                return True
    return False
