import socket
import sys
import threading
import time
from pathlib import Path

import pytest

# --import-mode=importlib: the shared fakes live in tests/router, which is not on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "router"))

from router_fakes import EOS, LoopThread, start_stack, write_model_dir  # noqa: E402

from gateway.config import GatewayConfig  # noqa: E402
from gateway.server import make_server  # noqa: E402


class GatewayThread:
    def __init__(self, config: GatewayConfig):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = make_server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def script(model_dir):
    from router.tokenizer import RouterTokenizer

    tok = RouterTokenizer(model_dir)
    return tok.encode(" The quick brown fox jumps over the lazy dog.") + [EOS]


@pytest.fixture(scope="module")
def stack(model_dir, script):
    lt = LoopThread()
    st = lt.run(start_stack(model_dir, script, token_delay_s=0.002))
    gw = GatewayThread(GatewayConfig(router=st.address))
    gw_key = GatewayThread(GatewayConfig(router=st.address, api_key="sekret"))
    yield {"url": gw.url, "url_key": gw_key.url, "stack": st, "loop": lt}
    gw.close()
    gw_key.close()
    lt.run(st.stop())
    lt.close()


@pytest.fixture(scope="module")
def make_gateway():
    """Start in-process gateways with any config; all are closed at the module's end."""
    started: list[GatewayThread] = []

    def make(config: GatewayConfig) -> str:
        started.append(GatewayThread(config))
        return started[-1].url

    yield make
    for gw in started:
        gw.close()
