"""tandem.v1 protobuf / gRPC code, generated from the .proto files in this folder.

The generated *_pb2*.py files are not committed: pip (setup.py build_py) creates them, and on a
fresh clone used through PYTHONPATH they are created here on first import, when grpc_tools is
installed (the test extra has it).
"""

from __future__ import annotations


def _ensure_generated() -> None:
    from protos import build

    if not build.is_stale():
        return
    try:
        build.generate()
    except ImportError:
        pass  # no grpc_tools: an installed package already ships the generated files
    except OSError:
        pass  # read-only install dir; use whatever is there


_ensure_generated()
