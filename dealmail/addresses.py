"""Email addresses: normalisation, strict parsing of the From header, and the Mailbox type.

Every other module compares addresses through :func:`normalize_address`, so that
``Alice@EXAMPLE.com`` and ``alice@example.com`` are one address and an IDN domain is
compared in its A-label form. :func:`parse_strict_mailbox` is the single place where a
header From becomes the sender's address: this Python (3.11.7) lacks the
CVE-2023-27043 fix, so ``email.utils.parseaddr`` would read
``ceo@company.com <x@evil.test>`` as ``ceo@company.com``; we refuse such values instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import getaddresses

__all__ = [
    "AddressError",
    "Mailbox",
    "decode_words",
    "domain_of",
    "format_mailbox",
    "normalize_address",
    "normalize_domain",
    "parse_address_list",
    "parse_strict_mailbox",
]


class AddressError(ValueError):
    """A header that cannot be read as the address(es) it must hold."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address with its display name; ``address`` is always normalised."""

    address: str
    name: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"address": self.address, "name": self.name}


def format_mailbox(name: str | None, address: str) -> str:
    """``Name <address>`` for people to read, or the bare address when there is no display
    name (an empty name must not leave ``  <address>`` with a double space)."""
    name = " ".join((name or "").split())
    return f"{name} <{address}>" if name else address


# RFC 5321 §4.5.3.1: 64 octets local part, 255 domain; we only need a sanity bound.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[^"\\\r\n]|\\.)*"'
_LOCAL_RE = re.compile(rf"^(?:{_DOT_ATOM}|{_QUOTED})$")
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and convert an IDN to its A-label (RFC 5890) form."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # address literal, RFC 5321 §4.1.3
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise AddressError(f"invalid domain {domain!r}") from exc
    labels = ascii_domain.split(".")
    if len(labels) < 1 or not all(_LABEL_RE.match(label) for label in labels):
        raise AddressError(f"invalid domain {domain!r}")
    return ascii_domain


def normalize_address(address: str) -> str:
    """Return ``local@domain`` with the domain normalised; the local part is kept as sent
    except that it is compared case-insensitively (lower-cased), as every mail system a
    sales team uses treats it so. Raises :class:`AddressError` when it is not an address."""
    address = address.strip()
    if address.lower().startswith("mailto:"):
        address = address[7:]
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    quoted_local = address.startswith('"') and '"@' in address
    if any(c in address for c in "\r\n\x00 \t<>,;") and not quoted_local:
        raise AddressError(f"not a single address: {address!r}")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise AddressError(f"not an address: {address!r}")
    if len(local) > 64 or not _LOCAL_RE.match(local):
        raise AddressError(f"invalid local part in {address!r}")
    return f"{local.lower()}@{normalize_domain(domain)}"


def domain_of(address: str) -> str:
    """The (already normalised) domain of a normalised address."""
    return address.rpartition("@")[2]


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words in a raw header value; never raises."""
    if "=?" not in value:
        return " ".join(value.split())
    try:
        return " ".join(str(make_header(decode_header(value))).split())
    except (UnicodeError, LookupError, ValueError, AssertionError):
        return " ".join(value.split())


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()


def parse_strict_mailbox(value: str) -> Mailbox:
    """Parse a From header value that must hold exactly one mailbox.

    Refuses what a lenient parser would silently reinterpret (docs/reliability.md B.7):
    several mailboxes, an address followed by another in angle brackets, NULs, an
    encoded-word that hides an address outside the brackets, unbalanced quotes.
    """
    raw = _unfold(value)
    if not raw:
        raise AddressError("From header is empty")
    if any(c in raw for c in "\x00\r\n"):
        raise AddressError("From header contains control characters")
    if raw.count("<") != raw.count(">") or raw.count("<") > 1:
        raise AddressError("From header has unbalanced or several angle-bracket addresses")
    if raw.count('"') % 2:
        raise AddressError("From header has an unbalanced quote")
    if "<" in raw:
        display, _, rest = raw.partition("<")
        addr, _, trailer = rest.partition(">")
        if trailer.strip():
            raise AddressError("From header has text after the address")
        display = display.strip()
        # A bare (unquoted) display name that itself contains "@" is the classic
        # "ceo@company.com <x@evil.test>" trick; an encoded-word is decoded as a name
        # only, never as an address (RFC 2047 §5).
        if display and not (display.startswith('"') and display.endswith('"')):
            if "@" in display and "=?" not in display:
                raise AddressError(
                    "From display name looks like an address but is not quoted"
                )
            if "," in display or ";" in display or ":" in display:
                raise AddressError("From display name has list punctuation")
        name = display[1:-1].replace('\\"', '"') if display.startswith('"') else display
        name = decode_words(name)
        try:
            address = normalize_address(addr)
        except AddressError as exc:
            raise AddressError(f"From address: {exc}") from exc
        return Mailbox(address, name)
    # No angle brackets: either bare addr-spec or addr-spec (comment).
    pairs = getaddresses([raw])
    if len(pairs) != 1 or "," in raw.replace('\\"', "").split('"')[0]:
        raise AddressError("From header must hold exactly one mailbox")
    name, addr = pairs[0]
    stripped = re.sub(r"\([^()]*\)", "", raw).strip()
    if stripped.lower() != addr.lower():
        raise AddressError("From header is not a single plain address")
    try:
        address = normalize_address(addr)
    except AddressError as exc:
        raise AddressError(f"From address: {exc}") from exc
    return Mailbox(address, decode_words(name))


def parse_address_list(values: list[str], dropped: list[str] | None = None) -> list[Mailbox]:
    """Parse To/Cc style headers leniently (they only describe participants, never
    authority); entries that are not addresses are dropped, and listed in ``dropped`` when
    given (so that a reader can report the loss)."""
    out: list[Mailbox] = []
    seen: set[str] = set()
    decoded = [_unfold(v) for v in values if v]
    for name, addr in getaddresses(decoded):
        if not addr or "@" not in addr:
            if (addr or name) and dropped is not None:
                dropped.append(addr or name)
            continue
        try:
            norm = normalize_address(addr)
        except AddressError:
            if dropped is not None:
                dropped.append(addr)
            continue
        if norm in seen:
            continue
        seen.add(norm)
        out.append(Mailbox(norm, decode_words(name)))
    return out
