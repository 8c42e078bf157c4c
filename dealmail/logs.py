"""Logging set-up: one line per decision, to stderr or the configured file."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info", log_file: str = "") -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; our own lines carry the decisions.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
