"""Several gateway processes on one port (`tandem serve --gateways N`)."""

from __future__ import annotations

import os
import tempfile

from gateway.metrics import MULTIPROC_ENV


def gateway_pool(count: int) -> tuple[list[str], dict[str, str] | None, str | None]:
    """What `count` gateway processes on one port each get: extra flags, their environment
    and the shared metrics directory (the caller removes it). One gateway: nothing extra."""
    if count == 1:
        return [], None, None
    metrics_dir = tempfile.mkdtemp(prefix="tandem-gateway-metrics-")
    return ["--reuse-port"], {**os.environ, MULTIPROC_ENV: metrics_dir}, metrics_dir
