"""Recipient routing: which of dealmail's addresses an RCPT names, with the kinds of address as
data.

Every kind of address (the Smart BCC address, ``+deal<ID>``, ``+ask``, ``+choice-<token>``)
is one :class:`AddressKind` entry in :data:`KINDS`: the pattern of its ``+suffix`` with named
captures (Salmon's idea, without its global router), how ``check-config`` describes it, and
whether several recipients of that kind may share one transaction. The handler of a kind says
which kinds it serves (``serves``) and checks them at RCPT time (``rcpt_check``), so adding an
address means one entry here and its handler. The table is built from the config and swapped
whole on reload. Anything else, including every address outside the mail domain, is not ours:
dealmail is not a relay on its inbound listener.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dealmail.addresses import AddressError, normalize_address
from dealmail.config import Company, Config

__all__ = ["KINDS", "MTA_ONLY_KINDS", "AddressKind", "Route", "RoutingTable", "kind_named",
           "mailbox_key"]


@dataclass(frozen=True)
class AddressKind:
    """One kind of dealmail address: ``<slug>@`` or ``<slug>+<suffix>@`` the mail domain."""

    name: str
    #: Regular expression of the part after ``+`` (empty: the plain company address). Named
    #: groups become the route's parameters; they are taken from the address as sent, since
    #: a token is case-sensitive.
    suffix: str
    #: How ``check-config`` shows it, with ``{slug}`` and ``{domain}``.
    form: str
    purpose: str
    #: Whether recipients of batchable kinds may share one transaction (each is a copy for
    #: the same capture); any other kind gets a transaction of its own (RFC 5321 §3.3: 452
    #: for the extra recipient makes the client send it again separately).
    batchable: bool = False


KINDS: tuple[AddressKind, ...] = (
    AddressKind("bcc", "", "{slug}@{domain}",
                "Smart BCC: a user's copy of their mail, or a forwarded customer mail",
                batchable=True),
    AddressKind("deal", r"deal(?P<deal_id>\d{1,18})", "{slug}+deal<ID>@{domain}",
                "a user's copy, linked to deal ID", batchable=True),
    AddressKind("ask", r"ask", "{slug}+ask@{domain}",
                "questions about a deal's, person's or organization's conversations"),
    AddressKind("choice", r"choice-(?P<token>[A-Za-z0-9_-]{16,128})",
                "{slug}+choice-<token>@{domain}", "answers to \"which deal?\" questions"),
    # Copies made by the company's Postfix (mta/lmtp.py, mta/postfix.py): only its LMTP
    # listener serves them, never the inbound SMTP listener, and the generated Postfix
    # config refuses them at Postfix's own door.
    AddressKind("sent", r"sent", "{slug}+sent@{domain}",
                "behind Postfix: copies of mail users send (sender_bcc_maps, LMTP only)",
                batchable=True),
    AddressKind("received", r"received-(?P<mailbox>[0-9a-f]{12})",
                "{slug}+received-<userkey>@{domain}",
                "behind Postfix: copies of mail a user receives (recipient_bcc_maps, LMTP only)",
                batchable=True),
)

#: The kinds only the LMTP listener behind the company's MTA serves.
MTA_ONLY_KINDS = frozenset({"sent", "received"})


def mailbox_key(slug: str, address: str) -> str:
    """The ``<user key>`` of a user's ``+received-`` address: stable for as long as the
    user's primary address stays the same (the Postfix maps are generated again when it
    changes), short enough for RFC 5321's 64-octet local part. Not a secret: Postfix refuses
    these addresses from outside (mta/postfix.py)."""
    digest = hashlib.sha256(f"{slug}\0{address}".encode()).hexdigest()
    return digest[:12]


def kind_named(name: str, kinds: Iterable[AddressKind] = KINDS) -> AddressKind:
    for kind in kinds:
        if kind.name == name:
            return kind
    raise KeyError(name)


@dataclass(frozen=True)
class Route:
    kind: str
    company: Company
    address: str
    params: Mapping[str, str] = field(default_factory=dict)
    batchable: bool = False

    @property
    def deal_id(self) -> int | None:
        value = self.params.get("deal_id")
        return int(value) if value else None

    @property
    def token(self) -> str | None:
        return self.params.get("token")


def _pattern(kinds: Iterable[AddressKind]) -> re.Pattern[str]:
    alternatives = [f"(?P<k_{k.name}>{k.suffix})" for k in kinds if k.suffix]
    suffix = f"(?:\\+(?:{'|'.join(alternatives)}))?" if alternatives else ""
    return re.compile(rf"^(?P<slug>[a-z0-9._-]+?){suffix}$", re.IGNORECASE)


class RoutingTable:
    def __init__(self, config: Config, enabled: Iterable[str] = ("bcc", "deal"),
                 kinds: Iterable[AddressKind] = KINDS) -> None:
        self.mail_domain = config.mail_domain
        self.companies = {c.slug: c for c in config.companies}
        self.kinds = {k.name: k for k in kinds}
        self.enabled = frozenset(enabled)
        self._plain = next((k for k in self.kinds.values() if not k.suffix), None)
        self._re = _pattern(self.kinds.values())

    def route(self, address: str) -> Route | None:
        """The route of an RCPT address, or None when it is not one of ours (550 5.1.1)."""
        try:
            norm = normalize_address(address)
        except AddressError:
            return None
        if norm.rpartition("@")[2] != self.mail_domain:
            return None
        # Parameters are read from the local part as sent (a token is case-sensitive).
        local = address.strip().strip("<>").rpartition("@")[0]
        m = self._re.match(local)
        if m is None:
            return None
        company = self.companies.get(m.group("slug").lower())
        if company is None:
            return None
        kind = next((k for k in self.kinds.values() if k.suffix and m.group(f"k_{k.name}")),
                    self._plain)
        if kind is None or kind.name not in self.enabled:
            return None
        params = {name: value for name, value in m.groupdict().items()
                  if value is not None and name != "slug" and not name.startswith("k_")}
        return Route(kind=kind.name, company=company, address=norm, params=params,
                     batchable=kind.batchable)
