"""`tandem bench` end to end: the real router and gateway processes in front of FAKE workers
(bench.fake_worker: no model; this checks the benchmark tool and the token path's
accounting, never model output)."""

import json
import subprocess
import sys

import pytest

from bench import main
from bench.fake_stack import FakeStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def stack(smollm2_dir):
    # One fake prefill: requests take the disaggregated path (KVTarget, Prefill, KV push).
    with FakeStack(smollm2_dir, num_decode=1, num_prefill=1) as s:
        yield s


def run_bench(stack, tmp_path, *flags):
    out = tmp_path / "result.json"
    argv = ["--base-url", stack.base_url + "/v1", "--disable-tqdm", "--result-file", str(out)]
    argv += ["--tokenizer", str(stack.model_dir)]  # /v1/models names no paths
    assert main([*argv, *flags]) == 0
    return json.loads(out.read_text())


def test_poisson_run_counts_exact_tokens(stack, tmp_path, capsys):
    res = run_bench(
        stack, tmp_path, "--num-prompts", "12", "--random-input-len", "40",
        "--random-output-len", "9", "--request-rate", "60", "--max-concurrency", "4",
        "--goodput", "ttft:5000", "tpot:1000", "--metadata", "gpu=none",
    )  # fmt: skip
    s, reqs = res["summary"], res["requests"]
    assert (s["completed"], s["failed"]) == (12, 0)
    assert 1 <= s["max_concurrency_reached"] <= 4
    assert s["total_output_tokens"] == 12 * 9 and s["output_len_mismatches"] == 0
    assert s["good_requests"] == 12
    for r in reqs:
        # counted by the server: the token-id prompt arrived with exactly 40 tokens
        assert (r["prompt_tokens"], r["output_tokens"]) == (40, 9)
        assert r["finish_reason"] == "length"
        assert len(r["itl"]) == r["num_chunks"] - 1 >= 1
        assert 0 < r["ttft"] <= r["latency"]
    sends = sorted(r["send_time"] for r in reqs)
    assert sends[-1] > 0.02  # arrivals were spread, not all at t=0
    settings = res["settings"]
    assert settings["model"] == "fake" and settings["metadata"] == {"gpu": "none"}
    assert "api_key" not in settings
    table = capsys.readouterr().out
    assert "Successful requests:                     12" in table
    assert "P99 ITL (ms):" in table


def test_text_prompts_and_chat(stack, tmp_path):
    res = run_bench(
        stack, tmp_path, "--num-prompts", "4", "--random-input-len", "33",
        "--random-output-len", "5", "--prompt-format", "text", "--num-warmups", "0",
    )  # fmt: skip
    assert [r["prompt_tokens"] for r in res["requests"]] == [33] * 4
    chat = run_bench(
        stack, tmp_path, "--num-prompts", "3", "--random-input-len", "20",
        "--random-output-len", "6", "--endpoint-type", "chat",
    )  # fmt: skip
    assert chat["summary"]["completed"] == 3
    assert all(r["prompt_tokens"] > 20 for r in chat["requests"])  # + the chat template


def test_prefix_dataset_via_python_m(stack, tmp_path):
    out = tmp_path / "prefix.json"
    cmd = [
        sys.executable, "-m", "bench", "--base-url", stack.base_url,
        "--dataset-name", "prefix", "--num-prompts", "6", "--prefix-len", "32",
        "--num-prefixes", "2", "--suffix-len", "8", "--prefix-output-len", "4",
        "--disable-tqdm", "--result-file", str(out), "--tokenizer", str(stack.model_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in res["requests"]] == [40] * 6
    assert res["summary"]["total_output_tokens"] == 24


def test_unknown_model_stops_at_warm_up(stack, capsys):
    argv = ["--base-url", stack.base_url, "--model", "nope", "--num-prompts", "2"]
    argv += ["--tokenizer", str(stack.model_dir)]
    assert main([*argv, "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert "warm-up request failed: HTTP 404" in err and "nope" in err


def test_several_client_processes_merge_into_one_run(stack, tmp_path):
    """bench/gpu_serving.py's --num-clients (bench.processes, as control_plane.py):
    `tandem bench` processes started together (--start-at), the prompts split between them,
    one merged result on one clock."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_serving.py"
    spec = importlib.util.spec_from_file_location("gpu_serving", path)
    gpu_serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_serving)
    args = ["--tokenizer", str(stack.model_dir), "--dataset-name", "random"]
    args += ["--random-input-len", "20"]
    args += ["--random-output-len", "6", "--request-rate", "inf"]
    out = tmp_path / "w1.json"
    res = gpu_serving.bench_clients(
        stack.base_url + "/v1", out, args, 9, 2, seed=3, warmups=1, start_s=12.0
    )
    assert json.loads(out.read_text()) == res
    assert not list(tmp_path.glob("w1-client*.json"))  # merged, then removed
    s = res["summary"]
    assert (s["completed"], s["failed"], s["num_clients"]) == (9, 0, 2)
    assert s["total_output_tokens"] == 9 * 6 and s["output_len_mismatches"] == 0
    assert sorted(r["client"] for r in res["requests"]) == [0] * 5 + [1] * 4
    assert [st["num_prompts"] for st in res["settings"]] == [5, 4]
    assert [st["seed"] for st in res["settings"]] == [3, 4]
    assert [st["num_warmups"] for st in res["settings"]] == [1, 0]  # the first client warms up
    assert min(r["send_time"] for r in res["requests"]) >= 0
    assert s["client_start_spread_s"] < 5.0  # both began at start_at, not one after the other
