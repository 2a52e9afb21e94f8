"""The gateway and the router never import torch (nor transformers, which pulls it in)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


RUN = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, {fakes!r})
    from pathlib import Path
    import httpx
    import gateway.server, router.server, router.client  # the whole public surface
    from gateway.config import GatewayConfig
    from router_fakes import LoopThread, start_stack, write_model_dir
    sys.path.insert(0, {gw_tests!r})
    from conftest import GatewayThread

    model_dir = write_model_dir(Path({tmp!r}))
    lt = LoopThread()
    st = lt.run(start_stack(model_dir, [300, 301, 2]))
    gw = GatewayThread(GatewayConfig(router=st.address))
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                   json={{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}]}})
    assert r.status_code == 200, r.text
    with router.client.TandemClient(st.address) as c:
        c.complete("hi", max_tokens=2)
    gw.close(); lt.run(st.stop()); lt.close()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(json.dumps(heavy))
    """
)


@pytest.mark.timeout(120)
def test_gateway_and_router_never_load_torch(tmp_path):
    code = RUN.format(
        fakes=str(ROOT / "tests/router"), gw_tests=str(ROOT / "tests/gateway"), tmp=str(tmp_path)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
