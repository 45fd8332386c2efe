"""Logs on stderr, with the structured fields Arvados logs, as JSON lines or as text for people.

Callers pass fields through ``extra={...}`` (``logger.info("instance booted", extra={"Instance":
iid})``); every non-standard LogRecord attribute becomes a JSON key, or a ``Key=value`` pair in
text. ``SystemLogs.Format``/``LogLevel`` choose; an empty Format means JSON for a service and text
in dev mode or on a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_LEVELS = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "fatal", "INFO": "info", "DEBUG": "debug"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": _LEVELS.get(record.levelname, record.levelname.lower()),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _needs_quotes(v: str) -> bool:
    return not v or any(c in v for c in ' ="\n')


class TextFormatter(logging.Formatter):
    """``2026-11-29 06:47:31.123 INFO  instance booted  Instance=i-1 InstanceType=small``: local
    time, level, message, then the structured fields (quoted when they hold spaces)."""

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        level = _LEVELS.get(record.levelname, record.levelname.lower()).upper()
        fields = []
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                v = str(v)
                fields.append(f"{k}={json.dumps(v) if _needs_quotes(v) else v}")
        line = f"{t} {level:<7} {record.getMessage()}"
        if fields:
            line += "  " + " ".join(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def choose_format(configured: str = "", *, dev: bool = False, stream=None) -> str:
    """``json`` or ``text``: the configured one, else text in dev mode or on a terminal."""
    if configured:
        return configured
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "text" if dev or tty else "json"


def setup(level: str = "info", stream=None, fmt: str = "json") -> None:
    """Route every logger (pykka's included, so actor crashes are never silent) to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = {"warn": "warning", "fatal": "error", "panic": "error", "trace": "debug"}.get(level.lower(), level)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("paramiko", "azure", "urllib3", "waitress", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "Task queue depth is N" whenever a request waits for a thread: a warning per request in a
    # burst (thousands a second), not news
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def configure(cluster, *, level_override: str | None = None, dev: bool = False, stream=None) -> None:
    """Apply the loaded config's SystemLogs (a ``--log-level`` given on the command line wins)."""
    setup(level_override or cluster.log_level, stream,
          choose_format(cluster.log_format, dev=dev, stream=stream))
