"""Text pieces of the router: stop strings, incremental detokenization, chat templates."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.chat_template import TemplateError, render_chat
from router.detokenizer import IncrementalDetokenizer
from router.stop import StopStringMatcher
from router.tokenizer import RouterTokenizer


def run_matcher(pieces, stops, include=False):
    m = StopStringMatcher(stops, include)
    out = ""
    for p in pieces:
        delta, hit = m.feed(p)
        out += delta
        if hit:
            return out, hit
    return out + m.flush(), None


def test_stop_string_held_back_then_released():
    m = StopStringMatcher(["STOP"])
    assert m.feed("aS") == ("a", None)
    assert m.feed("TO") == ("", None)  # "STO" could still become "STOP"
    assert m.feed("x") == ("STOx", None)


def test_earliest_stop_wins():
    assert run_matcher(["ab", "cd", "ef"], ["de", "bc"]) == ("a", "bc")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcST P", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=10),
    stop=st.text(alphabet="abST P", min_size=1, max_size=4),
)
def test_stop_matches_like_str_find_for_any_split(text, cuts, stop):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, hit = run_matcher(pieces, [stop])
    if stop in text:
        assert (out, hit) == (text[: text.index(stop)], stop)
    else:
        assert (out, hit) == (text, None)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab é€🚀你 ", max_size=30))
def test_detokenizer_roundtrip_never_emits_replacement_chars(model_dir, text):
    tok = RouterTokenizer(model_dir)
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("prompt"))
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_detokenizer_skips_special_tokens(model_dir):
    tok = RouterTokenizer(model_dir)
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(d.add(i) for i in tok.encode("Hello") + [2]) == "Hello"


def test_chat_template_hf_semantics():
    tpl = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}\n{% endfor %}"
        "{% generation %}{{ 'gen' if add_generation_prompt }}{% endgeneration %}"
    )
    out = render_chat(tpl, [{"role": "user", "content": "é"}], True, {"bos_token": "<s>"})
    assert out == '<s>"é"\ngen'
    with pytest.raises(TemplateError, match="no bad roles"):
        render_chat(tpl, [{"role": "bad", "content": ""}])
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"


def test_token_bytes_of_split_characters(model_dir):
    tok = RouterTokenizer(model_dir)
    ids = tok.encode("🚀", add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == "🚀".encode()
