"""router.client (sync and asyncio) against a router over fake workers."""

import asyncio

import pytest
from router_fakes import EOS, LoopThread, start_stack, write_model_dir

from router.client import AsyncTandemClient, TandemClient, TandemError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("tiny_client"))
    from router.tokenizer import RouterTokenizer

    script = RouterTokenizer(model_dir).encode(" The quick brown fox") + [EOS]
    lt = LoopThread()
    st = lt.run(start_stack(model_dir, script))
    yield st.address
    lt.run(st.stop())
    lt.close()


def test_sync_client(router):
    with TandemClient(router, timeout=10) as c:
        chunks = list(c.generate("Hello", max_tokens=2, temperature=0.0))
        assert "".join(ch.text for ch in chunks) == " The quick"
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2
        done = c.complete(messages=[{"role": "user", "content": "hi"}], n=2)
        assert done.texts == [" The quick brown fox"] * 2 and done.finish_reasons == ["stop"] * 2
        assert c.detokenize(c.tokenize("Hello world")) == "Hello world"
        assert c.models() == ["tiny"]
        assert c.abort("nope") is False
        with pytest.raises(TandemError) as e:
            c.complete("x", temperature=-1.0)
        assert e.value.code == "INVALID_ARGUMENT" and e.value.param == "temperature"
        with pytest.raises(TypeError):
            c.complete("x", temprature=1.0)


def test_async_client(router):
    async def scenario():
        async with AsyncTandemClient(router, timeout=10) as c:
            texts = [ch.text async for ch in c.generate([5, 6, 7], max_tokens=3)]
            done = await c.complete("Hi", stop=["brown"])
            return texts, done, await c.models()

    texts, done, models = asyncio.run(scenario())
    assert "".join(texts) == " The quick brown"
    assert done.texts == [" The quick "] and models == ["tiny"]
