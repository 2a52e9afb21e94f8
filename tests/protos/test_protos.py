"""Proto files: commented, stable where workers depend on them, and built with no manual step."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos").glob("*.proto"))

pytestmark = pytest.mark.timeout(120)


def _copy_sources(dst: Path) -> Path:
    (dst / "protos").mkdir(parents=True)
    for p in [*PROTOS, ROOT / "protos/build.py", ROOT / "protos/__init__.py"]:
        shutil.copy(p, dst / "protos" / p.name)
    return dst


def test_every_field_is_commented():
    field = re.compile(r"^\s*(optional |repeated )?[\w.<>, ]+ \w+ = \d+;")  # not enum values
    for path in PROTOS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if field.match(line):
                above = lines[i - 1].strip()
                assert above.startswith("//"), f"{path.name}:{i + 1} uncommented: {line.strip()}"


def test_fresh_clone_generates_with_build(tmp_path):
    src = _copy_sources(tmp_path)
    assert not list((src / "protos").glob("*_pb2*.py"))
    env = {"PYTHONPATH": str(src)}
    gen = subprocess.run(
        [sys.executable, "-m", "protos.build"], cwd=src, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    code = (
        "from protos import router_pb2, worker_pb2, router_pb2_grpc, worker_pb2_grpc;"
        "print(router_pb2.GenerateRequest.DESCRIPTOR.full_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tandem.v1.GenerateRequest"
    names = {p.name for p in (src / "protos").iterdir()}
    for stem in ("common", "router", "worker"):
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"} <= names


def test_wheel_build_ships_generated_code(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    src = _copy_sources(tmp_path / "src")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=shutil.ignore_patterns("__py*"))
    (src / "README.md").write_text("tandem\n")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"protos/router_pb2.py", "protos/worker_pb2_grpc.py", "protos/common_pb2.pyi"} <= names
    # kernels/ ships as tandem_kernels: the name `kernels` is Hugging Face's (a transformers
    # dependency), and a second top-level `kernels` would shadow it or be shadowed
    assert "tandem_kernels/registry.py" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_worker_contract_field_numbers():
    # Prefill/decode servers are built against these numbers: changes must be additive.
    from protos import worker_pb2

    def numbers(msg):
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}

    assert numbers(worker_pb2.SessionEvent) == {
        "req_id": 1, "kv_target": 2, "tokens": 3, "error": 4,
    }  # fmt: skip
    assert numbers(worker_pb2.SessionRequest) == {"generate": 1, "abort": 2}
    assert numbers(worker_pb2.KVTarget) == {
        "handoff_id": 1, "decode_kv_address": 2, "block_ids": 3, "num_cached_tokens": 4,
        "block_size": 5, "transport": 6, "transports": 7, "pool": 8, "capability": 9,
    }  # fmt: skip
    assert numbers(worker_pb2.KVTransferMessage) == {
        "handoff_id": 1, "begin": 2, "written_slab": 3, "done": 4, "chunk": 5,
    }  # fmt: skip
    assert numbers(worker_pb2.KVBegin) == {
        "transport": 1, "pool_id": 2, "num_slabs": 3, "capability": 4,
    }  # fmt: skip
    assert numbers(worker_pb2.KVDone) == {"first_token_id": 1, "first_token_logprob": 2}
    assert numbers(worker_pb2.KVTransferReply) == {"reply": 1, "error": 2, "block_ids": 3}
    assert dict(worker_pb2.KVReply.items()) == {
        "KV_REPLY_UNSPECIFIED": 0, "KV_REPLY_GRANT": 1, "KV_REPLY_STOP": 2,
        "KV_REPLY_COMPLETE": 3,
    }  # fmt: skip
    assert numbers(worker_pb2.KVPoolExport)["cuda"] == 8
    assert numbers(worker_pb2.WorkerStats)["num_kv_handoffs"] == 11
    assert numbers(worker_pb2.KVChunk) == {  # 1 and 9-11 are reserved
        "layer_start": 2, "layer_end": 3, "block_offset": 4, "num_blocks": 5, "dtype": 6,
        "shape": 7, "data": 8,
    }  # fmt: skip
    assert numbers(worker_pb2.DecodeRequest)["prefill_locally"] == 4
    services = worker_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {"Decode", "Prefill", "KVTransfer", "Registry"}
    assert set(services["KVTransfer"].methods_by_name) == {"Transfer"}
    assert set(services["Decode"].methods_by_name) == {"Session", "Abort", "Stats"}
