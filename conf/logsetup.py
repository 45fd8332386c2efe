"""JSON logs: one object per line on stderr, with the structured fields Arvados logs.

Callers pass fields through ``extra={...}`` (``logger.info("instance booted", extra={"Instance":
iid})``); every non-standard LogRecord attribute becomes a JSON key.
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


def setup(level: str = "info", stream=None) -> None:
    """Route every logger (pykka's included, so actor crashes are never silent) to JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("paramiko", "azure", "urllib3", "waitress", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
