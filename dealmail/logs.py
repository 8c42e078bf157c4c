"""Logging set-up: one line per decision, to stderr or the configured file.

No message content reaches a log at any level: the libraries below log what they handle at
DEBUG (peewee every SQL statement with its parameters, which hold the subject and the raw
bytes of each stored email; dkimpy the header values it hashes; aiosmtpd every command line),
so only dealmail's own loggers may write DEBUG lines, and dealmail's lines name messages by
queue id and Message-ID, never by their text.
"""

from __future__ import annotations

import logging
import sys

#: Loggers whose DEBUG lines carry message content (see the module docstring).
_CONTENT_LOGGERS = ("peewee", "dkimpy", "mail.log")


class _OwnDebugOnly(logging.Filter):
    """Lets a DEBUG record through only from dealmail's own loggers ("dealmail.*"), however
    a library's logger is configured later."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG or record.name.split(".", 1)[0] == "dealmail"


def setup_logging(level: str = "info", log_file: str = "") -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_OwnDebugOnly())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Not even formatted: peewee's statement log would cost a repr of every message blob.
    for name in _CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # aiosmtpd logs every command at INFO; our own lines carry the decisions.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
