"""Recipient routing: which of dealmail's addresses an RCPT names, as data.

Routes are patterns with named captures (Salmon's idea, without its global router): the
company slug, a deal id, a choice token. The table is built from the config and swapped
whole on reload. Anything else, including every address outside the mail domain, is not ours:
dealmail is not a relay on its inbound listener.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dealmail.addresses import AddressError, normalize_address
from dealmail.config import Company, Config

KINDS = ("bcc", "deal", "ask", "choice")


@dataclass(frozen=True)
class Route:
    kind: str  # bcc | deal | ask | choice
    company: Company
    address: str
    deal_id: int | None = None
    token: str | None = None


_LOCAL_RE = re.compile(
    r"^(?P<slug>[a-z0-9._-]+?)"
    r"(?:\+(?:deal(?P<deal>\d{1,18})|(?P<ask>ask)|choice-(?P<token>[A-Za-z0-9_-]{16,128})))?$"
)


class RoutingTable:
    def __init__(self, config: Config, enabled: frozenset[str] = frozenset({"bcc", "deal"})):
        self.mail_domain = config.mail_domain
        self.companies = {c.slug: c for c in config.companies}
        self.enabled = enabled

    def route(self, address: str) -> Route | None:
        """The route of an RCPT address, or None when it is not one of ours (550 5.1.1)."""
        try:
            norm = normalize_address(address)
        except AddressError:
            return None
        local, _, domain = norm.rpartition("@")
        if domain != self.mail_domain:
            return None
        m = _LOCAL_RE.match(local)
        if m is None:
            return None
        company = self.companies.get(m.group("slug"))
        if company is None:
            return None
        if m.group("deal"):
            kind = "deal"
        elif m.group("ask"):
            kind = "ask"
        elif m.group("token"):
            kind = "choice"
        else:
            kind = "bcc"
        if kind not in self.enabled:
            return None
        # The token is case-sensitive: take it from the address as sent.
        token = None
        if kind == "choice":
            token = address.strip().strip("<>").rpartition("@")[0].split("+choice-", 1)[1]
        return Route(kind=kind, company=company, address=norm,
                     deal_id=int(m.group("deal")) if m.group("deal") else None, token=token)
