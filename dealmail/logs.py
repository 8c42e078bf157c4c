"""Logging set-up: one line per decision, to stderr or the configured file.

Two formats: ``text`` (``TIME LEVEL LOGGER: message``, for people and grep) and ``json`` (one
object per line, for log shippers); a line that carries structured fields
(``extra={"fields": {...}}``, e.g. a delivery's ``to``, ``relay``, ``dsn``, ``status``) has them
as keys of its JSON object. A log file is opened with :class:`logging.handlers.WatchedFileHandler`
(a file moved away by logrotate is noticed at the next line) and :func:`reopen_logs` reopens
it on SIGHUP, as Postfix and most daemons do.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``msg``,
    the record's structured ``fields``, and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", log_file: str = "", log_format: str = "text") -> None:
    handler: logging.Handler
    handler = (logging.handlers.WatchedFileHandler(log_file) if log_file
               else logging.StreamHandler(sys.stderr))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; our own lines carry the decisions.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def reopen_logs() -> int:
    """Reopen every log file of the root logger (SIGHUP after logrotate moved it away);
    returns how many were reopened."""
    count = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
            count += 1
    return count
