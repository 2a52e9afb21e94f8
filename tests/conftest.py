"""Suite-wide set-up: the generated gRPC code matches the .proto files before any test runs."""

from protos import build


def pytest_configure(config) -> None:
    # an edited .proto since the last `pip install -e .`: rebuild, as pip would
    if build.is_stale():
        build.generate()
