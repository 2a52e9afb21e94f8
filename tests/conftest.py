"""Suite-wide set-up, before any test runs:
- the generated gRPC code matches the .proto files;
- TANDEM_CACHE points into this checkout's .pytest_cache unless the user set it, so the tests
  never write into ~/.cache/tandem on their own; every process the tests start inherits it, and
  the default model is converted there once per content, not once per test.

And after the last test: triton's nanobind bindings report dozens of "leaked" objects when an
interpreter that ran a Triton kernel exits (a known report of triton's teardown, not of these
tests); a process that loaded triton closes its stderr at exit, after pytest has reported
everything, as triton does for its own compile workers.
"""

import atexit
import os
import sys
from pathlib import Path

from protos import build

TEST_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "tandem"


def pytest_configure(config) -> None:
    # an edited .proto since the last `pip install -e .`: rebuild, as pip would
    if build.is_stale():
        build.generate()
    if not os.environ.get("TANDEM_CACHE"):
        os.environ["TANDEM_CACHE"] = str(TEST_CACHE)


def _silence_exit_stderr() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def pytest_unconfigure(config) -> None:
    if "triton" in sys.modules:  # (atexit runs this before the modules' teardown)
        atexit.register(_silence_exit_stderr)
