"""One log format for every tandem process (gateway, router, workers, serve, tp ranks).

Lines are logfmt, so `grep event=` and any logfmt parser read every service's log alike:

    ts=2025-01-31T12:00:00.123Z level=info logger=tandem.router event=router_ready address=...

Our messages are `event=<name> key=value ...`; a message from another library (one not starting
with `event=`) becomes `msg="..."`. Torch-free: the router and gateway import this module.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

# chatty libraries: their INFO lines are per request (uvicorn.access, httpx) or repeat what our
# own events say (uvicorn's "Uvicorn running on ..." vs event=gateway_listening)
QUIET_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "grpc",
    "httpx",
    "httpcore",
    "hpack",
    "urllib3",
    "filelock",
    "huggingface_hub",
)
LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "info"


def quote(value: object) -> str:
    """A logfmt value: bare when it is one token, double-quoted (with \\ and " escaped) otherwise."""
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    )
    return f'"{escaped}"'


def event(name: str, **fields: object) -> str:
    """`event=<name> k=v ...` with each value quoted as needed, for log calls that build a line."""
    return " ".join([f"event={name}", *(f"{k}={quote(v)}" for k, v in fields.items())])


class LogfmtFormatter(logging.Formatter):
    """ts (ISO 8601, UTC, ms) level (lower case) logger, then the event's own key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage()
        if not message.startswith("event="):
            message = f"msg={quote(message)}"
        line = (
            f"ts={when}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {message}"
        )
        if record.exc_info:
            # a traceback stays readable on its own lines after the event it belongs to
            line = f"{line}\n{self.formatException(record.exc_info)}"
        elif record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    return number


def configure_logging(level: str | int = DEFAULT_LEVEL, stream: TextIO | None = None) -> None:
    """Send every log record to stderr (or `stream`) in the one format; call once at process entry.

    Replaces a handler this function installed before (so calling it twice does not double
    lines) but leaves other handlers, e.g. pytest's log capture, alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tandem_logfmt", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    handler._tandem_logfmt = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    number = level_number(level)
    root.setLevel(number)
    # --log-level debug asks for everything, the libraries' chatter included
    quiet = number if number <= logging.DEBUG else max(number, logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    # warnings.warn (e.g. from transformers) goes through logging in the same format
    logging.captureWarnings(True)
