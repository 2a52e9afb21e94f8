"""Generate the Python gRPC code for protos/*.proto (never committed, see STYLE.md).

Used by setup.py (build_py, so `pip install .` and `pip install -e .` ship working code), by
the test suite's conftest (a .proto edited since the install is rebuilt before the tests) and
by hand: `python -m protos.build`. Equivalent to running, from the repo root,
`python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto`,
which yields `from protos import x_pb2` imports with no rewriting.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def outputs(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Every file generation produces, next to the .proto files."""
    return [p.with_name(p.stem + s) for p in sorted(proto_dir.glob("*.proto")) for s in SUFFIXES]


def is_stale(proto_dir: Path = PROTO_DIR) -> bool:
    """True when a generated file is missing or older than its .proto."""
    for proto in proto_dir.glob("*.proto"):
        for suffix in SUFFIXES:
            out = proto.with_name(proto.stem + suffix)
            if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc over proto_dir/*.proto; the results land beside them.

    protoc writes into a temporary tree first and each file is moved into place with
    os.replace, so concurrent importers (several test processes starting at once) never
    see a half-written module.
    """
    import grpc_tools
    from grpc_tools import protoc

    root = proto_dir.parent
    protos = sorted(proto_dir.glob("*.proto"))
    # google/protobuf/*.proto ship inside grpc_tools; needed if a .proto imports them.
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(dir=proto_dir) as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{proto_dir.name}/{p.name}" for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto_dir}")
        written = []
        for out in outputs(proto_dir):
            os.replace(Path(tmp) / proto_dir.name / out.name, out)
            written.append(out)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path, file=sys.stderr)
