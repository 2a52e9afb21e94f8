"""HTTP /tokenize and /detokenize (vLLM's shape) through the real gateway and router, checked
against HF transformers on SmolLM2's tokenizer; and the served model name in responses to
requests that name no model.

The model dir holds SmolLM2-135M-Instruct's real tokenizer with its chat template extended by
a tools section and an `enable_thinking` variable, so that the template visibly receives what
/tokenize passes (HF renders the same template as the reference). The workers are fakes: no
weights are loaded.
"""

import json
import shutil
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.config import GatewayConfig
from tandem.loader.default_model import resolve_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "router"))
from router_fakes import EOS, LoopThread, start_stack  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOOLS_PREFIX = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "={{ t['function']['parameters'] | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
)
THINKING_SUFFIX = (
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
)
MSGS = [{"role": "user", "content": "What is 2+2? Café ☕"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    src = Path(resolve_model_dir(None))
    dst = tmp_path_factory.mktemp("smollm2_tokenizer")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    smollm2_template = (src / "chat_template.jinja").read_text().rstrip("\n")
    cfg["chat_template"] = TOOLS_PREFIX + smollm2_template + THINKING_SUFFIX
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def urls(model_dir, hf, make_gateway):
    lt = LoopThread()
    script = hf.encode(" four", add_special_tokens=False) + [EOS]
    st = lt.run(start_stack(model_dir, script))
    yield {
        "url": make_gateway(GatewayConfig(router=st.address)),
        "url_key": make_gateway(GatewayConfig(router=st.address, api_key="sekret")),
        "url_alias": make_gateway(GatewayConfig(router=st.address, served_model_name="alias")),
    }
    lt.run(st.stop())
    lt.close()


def _post(urls, path, body, **kw):
    return httpx.post(urls["url"] + path, json=body, timeout=30, **kw)


def _max_model_len(urls) -> int:
    return httpx.get(urls["url"] + "/v1/models").json()["data"][0]["max_model_len"]


@pytest.mark.parametrize(
    "text", ["Hello world!", " leading space, ünïcödé and 😀", "<|im_start|>x"]
)
@pytest.mark.parametrize("add_special_tokens", [None, True, False])
def test_tokenize_prompt_matches_hf(urls, hf, text, add_special_tokens):
    body = {"prompt": text}
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens
    r = _post(urls, "/tokenize", body)
    assert r.status_code == 200, r.text
    want = hf.encode(text, add_special_tokens=add_special_tokens is not False)
    assert r.json() == {
        "count": len(want), "max_model_len": _max_model_len(urls), "tokens": want,
        "token_strs": None,
    }  # fmt: skip


def test_tokenize_returns_token_strs(urls, hf):
    r = _post(
        urls, "/tokenize", {"model": "tiny", "prompt": "Hello world", "return_token_strs": True}
    )
    assert r.status_code == 200, r.text
    ids = hf.encode("Hello world")
    assert r.json()["tokens"] == ids
    assert r.json()["token_strs"] == hf.convert_ids_to_tokens(ids)  # "Ġworld"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tokenize_messages_matches_hf_chat_template(urls, hf, add_generation_prompt):
    r = _post(urls, "/tokenize", {"messages": MSGS, "add_generation_prompt": add_generation_prompt})
    assert r.status_code == 200, r.text
    want = hf.apply_chat_template(
        MSGS, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert r.json()["tokens"] == list(want) and r.json()["count"] == len(want)


def test_tokenize_messages_with_tools_and_template_kwargs(urls, hf):
    body = {"messages": MSGS, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    r = _post(urls, "/tokenize", body)
    assert r.status_code == 200, r.text
    text = hf.apply_chat_template(
        MSGS, tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert "Tools: add=" in text and text.endswith("<think></think>")  # the template used both
    assert r.json()["tokens"] == hf.encode(text, add_special_tokens=False)


def test_tokenize_counts_what_chat_completions_bills(urls):
    client = openai.OpenAI(base_url=urls["url"] + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    count = _post(urls, "/tokenize", {"messages": MSGS}).json()["count"]
    assert r.usage.prompt_tokens == count


@pytest.mark.parametrize("skip", [False, True])
def test_detokenize_matches_hf(urls, hf, skip):
    ids = hf.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = _post(urls, "/detokenize", {"tokens": list(ids)})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": hf.decode(ids)}  # special tokens kept, as vLLM
    assert "<|im_start|>" in r.json()["prompt"]


def _assert_error(r, status, param, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)


def test_tokenizer_endpoint_errors(urls):
    _assert_error(_post(urls, "/detokenize", {"tokens": [10**6]}), 400, "tokens")
    _assert_error(_post(urls, "/detokenize", {"tokens": [-1]}), 400, "tokens")
    _assert_error(_post(urls, "/detokenize", {"tokens": "abc"}), 400, "tokens")
    _assert_error(_post(urls, "/tokenize", {"prompt": "x", "messages": MSGS}), 400, None)
    _assert_error(_post(urls, "/tokenize", {}), 400, None)
    _assert_error(_post(urls, "/tokenize", {"messages": [{"role": "x"}]}), 400, "messages")
    _assert_error(
        _post(urls, "/tokenize", {"model": "nope", "prompt": "x"}), 404, "model", "model_not_found"
    )
    _assert_error(_post(urls, "/tokenize", {"model": "", "prompt": "x"}), 400, "model")
    r = httpx.post(urls["url_alias"] + "/detokenize", json={"model": "tiny", "tokens": [1]})
    _assert_error(r, 404, "model", "model_not_found")
    r = httpx.post(urls["url_alias"] + "/detokenize", json={"model": "alias", "tokens": [42]})
    assert r.status_code == 200 and r.json()["prompt"]


def test_tokenizer_endpoints_need_the_api_key(urls):
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [42]})]:
        r = httpx.post(urls["url_key"] + path, json=body)
        _assert_error(r, 401, None, "invalid_api_key")
        r = httpx.post(
            urls["url_key"] + path, json=body, headers={"Authorization": "Bearer sekret"}
        )
        assert r.status_code == 200, r.text


def test_model_omitted_gets_the_served_name(urls):
    client = openai.OpenAI(base_url=urls["url"] + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model=None, messages=MSGS, max_tokens=2)
    assert r.model == "tiny"  # the router's served name (ListModels), never ""
    r = client.completions.create(model=None, prompt="hi", max_tokens=2)
    assert r.model == "tiny"
    chunks = list(client.chat.completions.create(model=None, messages=MSGS, stream=True))
    assert chunks and {c.model for c in chunks} == {"tiny"}
    alias = openai.OpenAI(base_url=urls["url_alias"] + "/v1", api_key="x", max_retries=0)
    assert alias.completions.create(model=None, prompt="hi", max_tokens=1).model == "alias"
