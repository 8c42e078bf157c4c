"""Composition of every email dealmail sends: headers that mark it as ours, and templates.

Every message dealmail writes carries ``Auto-Submitted: auto-generated`` (RFC 3834 §5) and our
marker header, so no auto-responder answers it and dealmail itself ignores it if it comes back
(no loops). Templates are Jinja2 with ``StrictUndefined`` (a missing value is an error, not an
empty string) and autoescaping for HTML; message text (subjects, names, bodies) is only ever
passed as data, never compiled as a template (docs/reliability.md A.34).
"""

from __future__ import annotations

import functools
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from dealmail.addresses import format_mailbox
from dealmail.config import Company, Config
from linking.parse import MARKER_HEADER

TEMPLATES = Path(__file__).resolve().parent / "templates"


def environment(folder: Path = TEMPLATES) -> Environment:
    """The Jinja2 environment for dealmail's own templates (HTML autoescaped)."""
    env = Environment(
        loader=FileSystemLoader(str(folder)),
        autoescape=select_autoescape(enabled_extensions=("html", "htm"),
                                     default_for_string=False, default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # ``{{ box | mailbox }}``: "Name <address>", or the bare address when the name is empty.
    env.filters["mailbox"] = lambda box: format_mailbox(box.get("name"), box["address"])
    return env


@functools.cache
def shared_environment() -> Environment:
    """The template environment, built once per process: its compiled templates never change
    while the process runs (templates are files of the installed package), so this is a
    constant, not mutable state; building it per email recompiled every template (a question
    drawn again for each email joining its batch compiled two templates each time)."""
    return environment()


def company_address(config: Config, company: Company, tag: str = "") -> str:
    """``<slug>@<mail domain>`` or ``<slug>+<tag>@<mail domain>``."""
    local = f"{company.slug}+{tag}" if tag else company.slug
    return f"{local}@{config.mail_domain}"


def new_message(
    config: Config,
    company: Company,
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None = None,
    kind: str,
    now: datetime,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
) -> EmailMessage:
    """A message from dealmail for ``company`` to ``to`` (text, with an HTML alternative)."""
    msg = EmailMessage()
    msg["From"] = f"dealmail ({company.name}) <{company_address(config, company)}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(idstring=kind, domain=config.mail_domain)
    if reply_to:
        msg["Reply-To"] = reply_to
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join([*(references or []), in_reply_to])
    msg["Auto-Submitted"] = "auto-generated"
    msg[MARKER_HEADER] = kind
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg


def render(env: Environment, name: str, **context: Any) -> str:
    return env.get_template(name).render(**context)
