"""Logs: JSON lines for machines, Rich lines for people. Nothing identifying:
no addresses, tokens or file contents, in either format.

The format is chosen once per process by `setup_logging`: "json" (one object per
line), "human" (Rich, on stderr) or "auto" (human on a terminal, JSON otherwise:
a pipe, a file or a log collector gets JSON unless told).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LOG_FORMATS = ("auto", "json", "human")
LogFormat = Literal["json", "human"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class HumanFormatter(logging.Formatter):
    """The message, then its structured fields as key=value (Rich adds time and level)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            text += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def resolve_log_format(requested: str, stream: TextIO | None = None) -> LogFormat:
    """ "json" or "human" for `requested` ("auto", "json", "human"); auto looks at `stream`."""
    if requested not in LOG_FORMATS:
        raise ValueError(f"log format {requested!r}: use one of {', '.join(LOG_FORMATS)}")
    if requested == "auto":
        out = sys.stderr if stream is None else stream
        return "human" if out.isatty() else "json"
    return "json" if requested == "json" else "human"


def setup_logging(level: str = "INFO", log_format: str = "json") -> None:
    handler: logging.Handler
    if resolve_log_format(log_format) == "human":
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(
            console=Console(stderr=True, soft_wrap=True),
            show_path=False,
            markup=False,
            omit_repeated_times=False,
        )
        handler.setFormatter(HumanFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log records client addresses: never enable it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
