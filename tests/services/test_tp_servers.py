"""Tensor-parallel workers as real processes on 127.0.0.1 (CPU, gloo), behind the router.

A tiny random Llama (4 heads, 2 KV heads) with SmolLM2's tokenizer, so the router tokenizes
and detokenizes as usual. Greedy tokens through the router equal the offline TP=1 engine's:
  - aggregated: a TP=2 decode server prefills locally;
  - disaggregated: a TP=2 prefill server gathers its ranks' KV heads and pushes them over the
    grpc transport into the TP=2 decode server, which scatters them over its ranks;
  - the same prefill server into a TP=1 decode server: the wire carries every KV head whatever
    the TP size, so the sizes need not match.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch

from router.client import TandemClient
from rpc.procs import free_port, wait_grpc_healthy
from tandem.loader.default_model import resolve_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 16
ENGINE = ["--device", "cpu", "--dtype", "float32", "--num-blocks", "256"]
ENGINE += ["--max-num-batched-tokens", "64", "--block-size", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama-tok")
    smol = resolve_model_dir(None)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # O(1) logits with clear margins (see core_helpers.redraw_weights)
        for name, p in hf.named_parameters():
            scale = 0.2 if "norm" in name else p.shape[-1] ** -0.5
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape))
    hf.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / f, path / f)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    from tandem import LLM, SamplingParams

    with LLM(model=str(model_dir), device="cpu", dtype="float32", num_blocks=256) as llm:
        outs = llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
    return [o.outputs[0].token_ids for o in outs]


# How long SIGTERM may take, per process, before the test kills it and fails: a worker's drain
# (the router's 5 s grace, 1.5 s quiet), its gRPC stop, then rank 1's stop (TP=2) and both
# interpreters' exit, with eight processes exiting at once on CI's two cores.
STOP_WAIT_S = 90


class Procs:
    def __init__(self, log_dir) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.killed: list[str] = []

    def start(self, *args: str) -> str:
        port = free_port("127.0.0.1")
        cmd = [sys.executable, "-m", "tandem_cli.main", *args, "--port", str(port)]
        self.logs.append(self.log_dir / f"{args[0]}-{port}.log")
        log = open(self.logs[-1], "w")  # noqa: SIM115 - the child's
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        wait_grpc_healthy(address, self.procs[-1], 240)
        return address

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        for p, log in zip(reversed(self.procs), reversed(self.logs), strict=True):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                tail = log.read_text().splitlines()[-15:]
                self.killed.append(f"{log.name} (killed after {STOP_WAIT_S}s):\n" + "\n".join(tail))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    procs = Procs(tmp_path_factory.mktemp("logs"))
    try:
        model = ["--model", str(model_dir)]
        tp2 = [*model, *ENGINE, "--tensor-parallel-size", "2"]
        decode = procs.start("decode", *tp2)
        prefill = procs.start("prefill", *tp2)
        decode_tp1 = procs.start("decode", *model, *ENGINE)
        aggregated = procs.start("router", *model, "--decode", decode)
        disaggregated = procs.start("router", *model, "--prefill", prefill, "--decode", decode)
        mixed = procs.start("router", *model, "--prefill", prefill, "--decode", decode_tp1)
        yield {
            "aggregated": aggregated,
            "disaggregated": disaggregated,
            "prefill_tp2_decode_tp1": mixed,
            "prefill": prefill,
            "logs": procs.log_dir,
        }
    finally:
        procs.stop()
    # each TP=2 server's rank 1 went with it: SIGTERM drained, stopped its rank, exited 0
    assert not procs.killed, "\n\n".join(procs.killed)
    assert [p.returncode for p in procs.procs] == [0] * 6


@pytest.mark.parametrize("mode", ["aggregated", "disaggregated", "prefill_tp2_decode_tp1"])
def test_tp2_servers_answer_like_tp1(servers, reference, mode):
    with TandemClient(servers[mode]) as client:
        for prompt, want in zip(PROMPTS, reference, strict=True):
            got = []
            for chunk in client.generate(
                prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
            ):
                got += chunk.token_ids
            assert got == want, (mode, prompt)
    if mode != "aggregated":
        # the prefill server did the prefills, and no handoff failed over to a local prefill
        stats = _prefill_stats(servers["prefill"])
        assert stats.prefix_cache_queries >= sum(len(p.split()) for p in PROMPTS)
        for log in servers["logs"].glob("router-*.log"):
            assert "event=worker_failed" not in log.read_text(), log.read_text()


def _prefill_stats(address: str):
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.PrefillStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
