"""Suite-wide set-up, before any test runs:
- the generated gRPC code matches the .proto files;
- TANDEM_CACHE points into this checkout's .pytest_cache unless the user set it, so the tests
  never write into ~/.cache/tandem on their own; every process the tests start inherits it, and
  the default model is converted there once per content, not once per test.
"""

import os
from pathlib import Path

from protos import build

TEST_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "tandem"


def pytest_configure(config) -> None:
    # an edited .proto since the last `pip install -e .`: rebuild, as pip would
    if build.is_stale():
        build.generate()
    if not os.environ.get("TANDEM_CACHE"):
        os.environ["TANDEM_CACHE"] = str(TEST_CACHE)
