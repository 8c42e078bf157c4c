"""Sender authentication: decide how sure we are that a message really comes from its From.

Only mail that really comes from a user may become that user's tracked email
(docs/reliability.md B.7-B.9). This module is pure: no database, no SMTP
server, and every DNS query goes through an injected function, so tests run offline and the
SMTP integration decides what to do with the :class:`Verdict`.

Levels, strongest first (``LEVELS`` lists them weakest first so that an index compares):

``strong``
    A DKIM signature that verifies, whose ``d=`` is DMARC-relaxed aligned with the From domain
    (RFC 7489 §3.1.1), whose ``h=`` covers From, without ``l=`` (or ``l=`` equal to the whole
    canonical body), RSA key of at least ``PolicyConfig.min_rsa_bits`` (1024 by default, which
    is also dkimpy's floor; 512/768 are always refused) or ed25519. EVERY DKIM-Signature is
    checked, not only the first (``dkim.verify()`` only checks the first: docs/reliability.md 0.5).
    A signature proves only the headers its ``h=`` lists: each of :data:`COVERED_HEADERS`
    (From, To, Cc, Subject, Date, Message-ID, what linking reads) must not be present more
    times than ``h=`` lists it (RFC 6376 §5.4.2, §8.15: an instance beyond those signed, or a
    header added where none was signed, is not covered). Otherwise anyone who once received a
    signed mail of a user could add a ``Cc:`` and replay it to make dealmail file it with, and
    create, a person of their choosing; such a message falls to the next level that applies.
    The header names a verdict's evidence covers are in :attr:`Verdict.covered`.
``upstream``
    Our trusted border MTA already did the work: its Authentication-Results (RFC 8601) says
    ``dmarc=pass header.from=<our From domain>`` or an aligned ``dkim=pass header.d=``. Only
    A-R headers in the "trusted zone" count: above the topmost Received, or in the contiguous
    block of A-R headers right below the topmost Received (a milter's A-R is written next to
    the Received its MTA adds). An A-R that claims a trusted id further down is a forgery
    (RFC 8601 §5) and is ignored with the reason kept in the evidence; two trusted A-Rs that
    disagree are ignored too. Deployment requirement (RFC 8601 §5): the border MTA must strip
    incoming A-R headers that claim its authserv-id.
``arc``
    An ARC chain (RFC 8617) with ``cv=pass`` whose seals were ALL made by configured trusted
    sealers, and whose ``i=1`` ARC-Authentication-Results shows an aligned ``dkim=pass`` or a
    ``dmarc=pass`` for the From domain, and whose latest ARC-Message-Signature covers
    :data:`COVERED_HEADERS` as ``strong`` requires of a DKIM signature. Requiring every seal
    to be trusted (not only the latest) is deliberate: ARC only requires the latest AMS to
    validate, so an untrusted intermediate hop could rewrite the message or forge the i=1
    set while a trusted last hop still seals ``cv=pass`` (RFC 8617 §9.1: ARC conveys, it
    does not vouch).
``trusted-network``
    The SMTP client IP is inside ``PolicyConfig.trusted_networks``.
``spf``
    SPF (RFC 7208) passes for the client IP and the MAIL FROM domain (the HELO name when MAIL
    FROM is empty, §2.3), and that domain is relaxed-aligned with From. Skipped for loopback /
    unspecified client IPs (behind a local MTA without XFORWARD, the IP says nothing).
``none``
    Everything else.

Message-level rules from docs/reliability.md B.7 apply before any level: a missing or duplicated
singleton header (RFC 5322 §3.6 table), a From header that is not exactly one mailbox, a From
that differs from the ``from_address`` the caller parsed, or a Sender that differs from From
make the verdict ``none``.

DNS failures (timeout, SERVFAIL) raise :class:`DnsTempError` from the injected lookup. They are
never a pass and never a hard fail: the verdict gets ``temp_error=True`` when a check that could
have given a *stronger* level than the one reached failed temporarily; the caller answers
``451 4.7.5`` (RFC 3463) unless the level reached already satisfies its minimum.

Organizational domains: a small built-in public-suffix rule (last two labels, or three when
the last two form a known multi-part suffix such as ``co.uk``). This is a documented
limitation, not the Public Suffix List: a domain under an unlisted multi-part suffix (e.g.
``example.org.uk`` style private registries, or hosting suffixes like ``github.io``) gets a
too-short organizational domain, which can align two unrelated registrants of that suffix.
Add suffixes to ``MULTI_PART_SUFFIXES`` or switch to the PSL when that matters.

dkimpy details this module relies on (dkimpy 1.1.x):

* ``dnsfunc(name: bytes, timeout=5) -> bytes | None``; dkimpy swallows its own
  ``DnsTimeoutError`` into ``False``, so our adapter raises :class:`DnsTempError` (not a
  ``DKIMException``) which dkimpy does not catch, and we turn it into ``temp_error``.
* dkimpy checks ``t=``/``x=`` against ``time.time()``; to inject a clock we override
  ``DKIM.verify_headerprep`` (same steps as upstream) and check ``t=``/``x=`` ourselves.
  ARC verification still uses the real clock (ARC has no ``x=``; ``t=`` is only checked for
  being in the future).
* dkimpy includes one extra ``from`` in ``h=`` when verifying (its bug #644046), so an added
  From header anywhere breaks the signature; :func:`singleton_violations` refuses it anyway.

SPF goes through pyspf with DNS injected by subclassing ``spf.query`` and overriding its
``dns()`` method (the single place pyspf queries DNS), keeping pyspf's lookup limits and
void-lookup counting (RFC 7208 §4.6.4). TXT uses the injected :data:`DnsTxt`; the ``a``,
``mx``, ``ptr`` and ``exists`` mechanisms need :data:`DnsQuery`; without one they match
nothing and the SPF result is recorded as unsupported (never a pass).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import authres
import authres.dmarc
import dkim
import spf
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value

from dealmail.addresses import (
    AddressError,
    normalize_address,
    normalize_domain,
    parse_strict_mailbox,
)
from dealmail.config import PolicyConfig

if TYPE_CHECKING:
    import dns.resolver

__all__ = [
    "COVERED_HEADERS",
    "LEVELS",
    "MULTI_PART_SUFFIXES",
    "SINGLETON_HEADERS",
    "DnsQuery",
    "DnsTempError",
    "DnsTxt",
    "SenderVerifier",
    "SignatureResult",
    "Verdict",
    "aligned",
    "coverage",
    "dnspython_query",
    "dnspython_txt",
    "organizational_domain",
    "replay_key",
    "singleton_violations",
]


class DnsTempError(Exception):
    """A DNS lookup failed temporarily (timeout, SERVFAIL, no reachable server)."""


#: TXT lookup: name -> list of TXT records (each record's strings already concatenated);
#: ``[]`` for NXDOMAIN / no record; raises :class:`DnsTempError` on timeout / SERVFAIL.
DnsTxt = Callable[[str], list[str]]
#: Other lookups for SPF: (name, qtype in A/AAAA/MX/PTR) -> list of values as text
#: (A/AAAA: addresses; MX: "preference exchange"; PTR: names). Same error contract as DnsTxt.
DnsQuery = Callable[[str, str], list[str]]

#: Weakest first, so ``LEVELS.index(a) >= LEVELS.index(b)`` means "a is at least b".
LEVELS: tuple[str, ...] = ("none", "spf", "trusted-network", "arc", "upstream", "strong")

#: RFC 5322 §3.6 fields that may occur at most once (Sender, Reply-To etc. included).
SINGLETON_HEADERS: tuple[str, ...] = (
    "from",
    "sender",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
)

#: Headers a signature must cover for the message to be believed on its strength: who sends
#: it, to whom (linking makes persons of To and Cc), and what identifies it.
COVERED_HEADERS: tuple[str, ...] = ("from", "to", "cc", "subject", "date", "message-id")

#: Second-level registry suffixes known to be multi-part (see module docstring limitation).
MULTI_PART_SUFFIXES: frozenset[str] = frozenset(
    {
        "co.uk", "org.uk", "me.uk", "ltd.uk", "plc.uk", "net.uk", "ac.uk", "gov.uk",
        "com.au", "net.au", "org.au", "edu.au", "gov.au",
        "co.jp", "ne.jp", "or.jp", "ac.jp", "go.jp",
        "com.br", "net.br", "org.br",
        "co.nz", "net.nz", "org.nz",
        "co.za", "com.cn", "net.cn", "org.cn", "com.mx", "com.ar", "com.tr",
        "co.in", "co.kr", "com.sg", "com.hk", "com.tw",
    }
)

_MAX_HEADER_BYTES = 1_000_000  # bound the header scan; real headers are far smaller
_HEADER_NAME_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_AAR_INSTANCE_RE = re.compile(r"^\s*i\s*=\s*\d+\s*;", re.IGNORECASE)
_AUTHSERV_RE = re.compile(r"^\s*([^\s;]+)")


# --------------------------------------------------------------------------- data types


@dataclass
class SignatureResult:
    """One DKIM-Signature header and what we concluded about it."""

    domain: str
    selector: str
    valid: bool
    aligned: bool
    covers_from: bool
    body_length_limit: int | None
    key_bits: int | None
    b_hash: str  # sha256 hex of the b= value (whitespace removed): audit and replay key
    reason: str
    body_hash: str = ""  # the bh= value (whitespace removed)
    algorithm: str = ""
    temp_error: bool = False
    #: The h= list as signed (lower case, in order; a name listed more often than present
    #: is over-signed, RFC 6376 §8.15).
    signed_headers: list[str] = field(default_factory=list)
    #: Header names of the message that the signature does not wholly cover: present more
    #: times than h= lists them (an instance may have been added after signing).
    uncovered: list[str] = field(default_factory=list)

    @property
    def qualifies_strong(self) -> bool:
        return self.valid and self.aligned and self.covers_from and self.reason == "ok"


@dataclass
class Verdict:
    """The level reached for one message, with JSON-serialisable evidence for audit."""

    level: str
    reason: str
    temp_error: bool = False
    signatures: list[SignatureResult] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    #: For a level proven by a signature (``strong``: DKIM; ``arc``: the latest
    #: ARC-Message-Signature), the header names of the message that signature wholly covers;
    #: linking must not read any other (linking.capture). None: the level does not rest on a
    #: signature of the headers (trusted network, upstream A-R, SPF, none).
    covered: frozenset[str] | None = None

    def at_least(self, minimum: str) -> bool:
        """True when this verdict's level is ``minimum`` or stronger (see :data:`LEVELS`)."""
        if minimum not in LEVELS:
            raise ValueError(f"unknown level {minimum!r}")
        return LEVELS.index(self.level) >= LEVELS.index(minimum)

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "reason": self.reason,
            "temp_error": self.temp_error,
            "signatures": [asdict(s) for s in self.signatures],
            "evidence": self.evidence,
        }


# --------------------------------------------------------------------------- domains


def organizational_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 §3.2) by the built-in suffix rule."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and ".".join(labels[-2:]) in MULTI_PART_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _norm_domain(domain: str) -> str | None:
    try:
        return normalize_domain(domain)
    except AddressError:
        return None


def aligned(domain: str, from_domain: str) -> bool:
    """DMARC relaxed alignment (RFC 7489 §3.1.1): same organizational domain. Both sides
    are normalised to A-labels first, so a homoglyph (``exаmple.com`` with a Cyrillic
    ``а``) becomes ``xn--...`` and never aligns with ``example.com``."""
    a, b = _norm_domain(domain), _norm_domain(from_domain)
    if not a or not b:
        return False
    return organizational_domain(a) == organizational_domain(b)


# --------------------------------------------------------------------------- headers


_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_DKIM_SIGNATURE_RE = re.compile(rb"(?im)^dkim-signature[ \t]*:")
_ARC_SEAL_RE = re.compile(rb"(?im)^arc-seal[ \t]*:")


def _header_end(raw: bytes) -> int:
    """Where the header block of ``raw`` ends (the blank line, RFC 5322 §2.1), looked for
    in its first ``_MAX_HEADER_BYTES``. dkimpy ends its header block at the same blank line
    (or at a blank first line), so a header it reads is always before this offset."""
    end = _HEADER_END_RE.search(raw, 0, _MAX_HEADER_BYTES)
    return end.start() if end is not None else min(len(raw), _MAX_HEADER_BYTES)


def _has_header(pattern: re.Pattern[bytes], raw: bytes) -> bool:
    """Whether a header line of the header block matches ``pattern``: searched without a
    copy and only up to the blank line, not through the body (a 1 MB case-insensitive scan
    of each large attachment was 15% of ingesting a realistic mix, py-spy)."""
    return pattern.search(raw, 0, _header_end(raw)) is not None


def _split_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw unfolded value) in message order; stops at the blank line.

    Our own tiny parser on purpose: it must see exactly what dkimpy sees, including
    ``From :`` (obs-optional WSP before the colon, RFC 5322 §4.5) which we count as From.
    """
    head = raw[:_header_end(raw)]
    out: list[tuple[str, bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
            continue
        m = _HEADER_NAME_RE.match(line)
        if m is None:
            continue  # not a header line (mbox "From " line, garbage): ignored here
        out.append((m.group(1).decode("ascii").lower(), line[m.end():].strip()))
    return out


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def singleton_violations(raw: bytes) -> list[str]:
    """Problems with RFC 5322 §3.6 singleton fields: duplicates, and a missing From.

    A duplicated From is the classic way to show one address while a signature covers
    another (docs/reliability.md B.7, B.9 #7/#8)."""
    counts: dict[str, int] = {}
    for name, _ in _split_headers(raw):
        if name in SINGLETON_HEADERS:
            counts[name] = counts.get(name, 0) + 1
    problems = [f"duplicated {name} header ({n}x)" for name, n in counts.items() if n > 1]
    if counts.get("from", 0) == 0:
        problems.append("missing From header")
    return problems


def _header_values(headers: Iterable[tuple[str, bytes]], name: str) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _counts(headers: Iterable[tuple[str, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _ in headers:
        counts[name] = counts.get(name, 0) + 1
    return counts


def coverage(signed: Iterable[str], counts: dict[str, int]) -> tuple[frozenset[str], list[str]]:
    """(header names of the message wholly covered by an ``h=`` list, the names of
    :data:`COVERED_HEADERS` that are not). A verifier signs the last instances of a name,
    as many as h= lists it (RFC 6376 §5.4.2): a name present more often than listed has an
    unsigned instance, which may have been added by anyone since (§8.15)."""
    listed: dict[str, int] = {}
    for name in signed:
        listed[name] = listed.get(name, 0) + 1
    covered = frozenset(n for n, present in counts.items() if present <= listed.get(n, 0))
    missing = [n for n in COVERED_HEADERS if counts.get(n, 0) > listed.get(n, 0)]
    return covered | frozenset(n for n in listed if n not in counts), missing


# --------------------------------------------------------------------------- DNS adapters


def _dkim_dnsfunc(dns_txt: DnsTxt, log: list[str]) -> Callable[..., bytes | None]:
    """Adapt :data:`DnsTxt` to dkimpy's ``dnsfunc(name: bytes, timeout=5)``."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            qname = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            return None  # a non-ASCII d=/s= cannot be a DNS name we look up
        try:
            records = dns_txt(qname)
        except DnsTempError as exc:
            log.append(f"{qname}: {exc}")
            raise
        if not records:
            return None
        # RFC 6376 §3.6.2.2: several records are undefined; prefer the one that has a key.
        chosen = next((r for r in records if "p=" in r), records[0])
        return chosen.encode("utf-8")

    return dnsfunc


class _InjectedSpfQuery(spf.query):  # type: ignore[misc]
    """pyspf query whose DNS goes through the injected resolvers (see module docstring)."""

    def __init__(
        self, *args: Any, dns_txt: DnsTxt, dns_query: DnsQuery | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._dns_txt = dns_txt
        self._dns_query = dns_query
        self.unsupported: list[str] = []
        self.temp_errors: list[str] = []

    def _lookup(self, name: str, qtype: str) -> list[Any]:
        try:
            if qtype in ("TXT", "SPF"):
                if qtype == "SPF":
                    return []  # RFC 7208 §3.1: type 99 is obsolete
                return [[r.encode("utf-8")] for r in self._dns_txt(name)]
            if self._dns_query is None:
                self.unsupported.append(f"{qtype} {name}")
                return []
            values = self._dns_query(name, qtype)
        except DnsTempError as exc:
            self.temp_errors.append(f"{qtype} {name}: {exc}")
            raise spf.TempError(f"DNS {exc}") from exc
        if qtype == "MX":
            out: list[Any] = []
            for v in values:
                parts = v.split()
                if len(parts) == 2 and parts[0].isdigit():
                    out.append((int(parts[0]), parts[1].rstrip(".")))
                else:
                    out.append((0, v.rstrip(".")))
            return out
        if qtype == "PTR":
            return [v.rstrip(".") for v in values]
        return list(values)

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        # Mirrors spf.query.dns (pyspf 2.0.14) minus CNAME chasing, which the injected
        # resolver does itself; keeps the cache and the void-lookup limit (RFC 7208 §4.6.4).
        if not name:
            raise spf.PermError("Invalid query")
        name = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            result = self._lookup(name, qtype)
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


def dnspython_txt(
    resolver: dns.resolver.Resolver | None = None, timeout: float = 5.0
) -> DnsTxt:
    """Production :data:`DnsTxt` on dnspython: NXDOMAIN/NoAnswer -> ``[]``;
    Timeout/NoNameservers (SERVFAIL from every server) -> :class:`DnsTempError`."""
    import dns.exception
    import dns.resolver

    res = resolver or dns.resolver.Resolver()

    def lookup(name: str) -> list[str]:
        try:
            answer = res.resolve(name, "TXT", lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTempError(f"{name}: {exc.__class__.__name__}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{name}: {exc}") from exc
        return [
            b"".join(rdata.strings).decode("utf-8", errors="replace") for rdata in answer
        ]

    return lookup


def dnspython_query(
    resolver: dns.resolver.Resolver | None = None, timeout: float = 5.0
) -> DnsQuery:
    """Production :data:`DnsQuery` (A/AAAA/MX/PTR for SPF) on dnspython."""
    import dns.exception
    import dns.resolver

    res = resolver or dns.resolver.Resolver()

    def lookup(name: str, qtype: str) -> list[str]:
        try:
            answer = res.resolve(name, qtype, lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTempError(f"{name}/{qtype}: {exc.__class__.__name__}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{name}/{qtype}: {exc}") from exc
        return [rdata.to_text() for rdata in answer]

    return lookup


# --------------------------------------------------------------------------- DKIM


class _ClockedDKIM(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's DKIM with ``t=``/``x=`` checked against an injected clock."""

    def __init__(self, message: bytes, *, now: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self._now = now

    def verify_headerprep(self, idx: int = 0) -> Any:
        # Same steps as dkim.DKIM.verify_headerprep (dkimpy 1.1.8), except the time checks.
        sigheaders = [(x, y) for x, y in self.headers if x.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        try:
            sig = parse_tag_value(sigheaders[idx][1])
        except InvalidTagValueList as exc:
            raise dkim.MessageFormatError(exc) from exc
        self.signature_fields = sig
        _check_times(sig, self._now)
        dkim.validate_signature_fields({k: v for k, v in sig.items() if k not in (b"t", b"x")})
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        include_headers = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders


_CLOCK_SLOP = 36000  # dkimpy's 10 h leeway for mailers with inaccurate clocks


def _check_times(sig: dict[bytes, bytes], now: float) -> None:
    """RFC 6376 §3.5 t= / x= rules, as dkimpy applies them, against ``now``."""
    t_sign: int | None = None
    if b"t" in sig:
        if not re.fullmatch(rb"\d+", sig[b"t"]):
            raise dkim.ValidationError(f"t= value is not a decimal integer ({sig[b't']!r})")
        t_sign = int(sig[b"t"])
        if t_sign > now + _CLOCK_SLOP:
            raise dkim.ValidationError(f"t= value is in the future ({t_sign})")
    if b"x" in sig:
        if not re.fullmatch(rb"\d+", sig[b"x"]):
            raise dkim.ValidationError(f"x= value is not a decimal integer ({sig[b'x']!r})")
        x_sign = int(sig[b"x"])
        if x_sign < now - _CLOCK_SLOP:
            raise dkim.ValidationError(f"x= value is past ({x_sign})")
        if t_sign is not None and x_sign < t_sign:
            raise dkim.ValidationError("x= value is less than t= value")


def _arc_instance(value: bytes) -> int:
    tags = _sig_tags(value) or {}
    raw = tags.get(b"i", b"")
    return int(raw) if raw.isdigit() else 0


def _sig_tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except (InvalidTagValueList, ValueError, IndexError):
        return None
    return tags


def _clean_b64(value: bytes) -> bytes:
    return re.sub(rb"\s+", b"", value)


def _ascii(value: bytes) -> str:
    return value.decode("ascii", errors="replace")


# --------------------------------------------------------------------------- A-R parsing


def _parse_ar(value: str) -> tuple[str | None, Any, str | None]:
    """(authserv-id, parsed header or None, error). Never raises (B.9 #19)."""
    guess = _AUTHSERV_RE.match(value)
    guessed_id = guess.group(1).lower() if guess else None
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception as exc:  # authres raises several types on hostile input
        return guessed_id, None, f"unparseable: {exc.__class__.__name__}"
    return str(parsed.authserv_id).lower(), parsed, None


def _result_props(result: Any) -> dict[str, str]:
    return {
        f"{p.type}.{p.name}".lower(): str(p.value)
        for p in getattr(result, "properties", []) or []
        if p.value is not None
    }


def _ar_summary(parsed: Any) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    out = []
    for r in parsed.results:
        props = tuple(sorted(_result_props(r).items()))
        out.append((str(r.method).lower(), str(r.result).lower(), props))
    return sorted(out)


def _ar_passes(parsed: Any, from_domain: str) -> str | None:
    """The first result in this A-R that authenticates ``from_domain``, described."""
    for r in parsed.results:
        method, result = str(r.method).lower(), str(r.result).lower()
        if result != "pass":
            continue
        props = _result_props(r)
        if method == "dmarc":
            hf = props.get("header.from", "")
            if hf and _norm_domain(hf.rpartition("@")[2]) == from_domain:
                return f"dmarc=pass header.from={hf}"
        elif method == "dkim":
            d = props.get("header.d") or props.get("header.i", "").rpartition("@")[2]
            if d and aligned(d, from_domain):
                return f"dkim=pass header.d={d}"
    return None


# --------------------------------------------------------------------------- verifier


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


class SenderVerifier:
    """Decides the :class:`Verdict` for messages under one :class:`PolicyConfig`."""

    def __init__(
        self,
        policy: PolicyConfig,
        dns_txt: DnsTxt,
        dns_query: DnsQuery | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.dns_txt = dns_txt
        self.dns_query = dns_query
        self.clock = clock
        self._trusted_ids = tuple(i.lower() for i in policy.trusted_authserv_ids)
        self._trusted_sealers = tuple(
            d for d in (_norm_domain(s) for s in policy.trusted_arc_sealers) if d
        )

    # ---- public

    def verify(
        self, raw: bytes, from_address: str, client_ip: str, mail_from: str, helo: str
    ) -> Verdict:
        """Verify one message as received (unstuffed DATA bytes, CRLF or LF)."""
        evidence: dict[str, Any] = {
            "client_ip": client_ip,
            "mail_from": mail_from,
            "helo": helo,
        }
        try:
            from_norm = normalize_address(from_address)
        except AddressError as exc:
            evidence["from_error"] = str(exc)
            return Verdict("none", f"From address not usable: {exc}", evidence=evidence)
        from_domain = _domain_of(from_norm)
        evidence["from_domain"] = from_domain
        headers = _split_headers(raw)

        signatures, dkim_temp = self._check_dkim(raw, from_domain, evidence)
        evidence["dkim"] = [
            {"d": s.domain, "s": s.selector, "b_hash": s.b_hash, "valid": s.valid,
             "aligned": s.aligned, "reason": s.reason}
            for s in signatures
        ]

        problems = self._message_problems(raw, headers, from_norm)
        if problems:
            evidence["message_problems"] = problems
            return Verdict("none", "; ".join(problems), signatures=signatures,
                           evidence=evidence)

        temp_missed: list[str] = []  # stronger checks that failed only temporarily

        strong = next((s for s in signatures if s.qualifies_strong), None)
        if strong is not None:
            covered, _ = coverage(strong.signed_headers, _counts(headers))
            evidence["covered_headers"] = sorted(covered)
            return Verdict("strong",
                           f"verified by aligned DKIM signature d={strong.domain}",
                           signatures=signatures, evidence=evidence, covered=covered)
        if dkim_temp:
            temp_missed.append("dkim")

        ip = self._parse_ip(client_ip)
        upstream = None
        if self.policy.upstream_networks and not (
            ip is not None and any(ip in net for net in self.policy.upstream_networks)
        ):
            evidence["authentication_results"] = {
                "skipped": "client not in upstream_networks: A-R headers not honoured"}
        else:
            upstream = self._check_upstream(headers, from_domain, evidence)
        if upstream is not None:
            return self._done("upstream", upstream, temp_missed, signatures, evidence)

        arc_reason, arc_temp = self._check_arc(raw, from_domain, evidence)
        if arc_reason is not None:
            done = self._done("arc", arc_reason, temp_missed, signatures, evidence)
            done.covered = frozenset(evidence["arc"]["covered_headers"])
            return done
        if arc_temp:
            temp_missed.append("arc")

        if ip is not None and any(ip in net for net in self.policy.trusted_networks):
            return self._done("trusted-network", f"client {ip} is in a trusted network",
                              temp_missed, signatures, evidence)

        spf_reason, spf_temp = self._check_spf(ip, mail_from, helo, from_domain, evidence)
        if spf_reason is not None:
            return self._done("spf", spf_reason, temp_missed, signatures, evidence)
        if spf_temp:
            temp_missed.append("spf")

        return self._done("none", self._none_reason(signatures), temp_missed, signatures,
                          evidence)

    def authentication_results(self, authserv_id: str, verdict: Verdict, from_domain: str) -> str:
        """Our own Authentication-Results value (RFC 8601 §2.2), built with authres.

        One ``dkim`` result per signature, the SPF result if evaluated, and our decision as
        ``x-dealmail-sender=pass|none|temperror reason="level <level>" header.from=<domain>``."""
        results: list[Any] = []
        for s in verdict.signatures:
            res = "pass" if s.valid else ("temperror" if s.temp_error else "fail")
            if s.reason.startswith("policy"):
                res = "policy"
            results.append(authres.DKIMAuthenticationResult(
                result=res, header_d=s.domain or None, header_s=s.selector or None,
                reason=None if s.valid else s.reason[:200]))
        spf_ev = verdict.evidence.get("spf")
        if isinstance(spf_ev, dict) and spf_ev.get("result"):
            kwargs: dict[str, str] = {}
            if spf_ev.get("identity") == "helo":
                kwargs["smtp_helo"] = str(spf_ev.get("domain", ""))
            else:
                kwargs["smtp_mailfrom"] = str(spf_ev.get("domain", ""))
            results.append(authres.SPFAuthenticationResult(result=str(spf_ev["result"]),
                                                           **kwargs))
        # Our decision as an extension method (RFC 8601 §2.7.6); we do not evaluate DMARC
        # policy records, so we must not claim a dmarc= result.
        decision = "pass" if verdict.level != "none" else (
            "temperror" if verdict.temp_error else "none")
        results.append(authres.AuthenticationResult(
            method="x-dealmail-sender", result=decision, reason=f"level {verdict.level}",
            properties=[authres.AuthenticationResultProperty("header", "from", from_domain)]))
        return str(authres.AuthenticationResultsHeader(authserv_id=authserv_id,
                                                       results=results).header_value())

    # ---- steps

    def _done(self, level: str, reason: str, temp_missed: list[str],
              signatures: list[SignatureResult], evidence: dict[str, Any]) -> Verdict:
        if temp_missed:
            evidence["temp_errors_in"] = list(temp_missed)
            reason = f"{reason}; temporary DNS failure in {', '.join(temp_missed)}"
        return Verdict(level, reason, temp_error=bool(temp_missed), signatures=signatures,
                       evidence=evidence)

    @staticmethod
    def _none_reason(signatures: list[SignatureResult]) -> str:
        if not signatures:
            return "no DKIM signature and no other verification"
        valid = [s for s in signatures if s.valid]
        if not valid:
            return "no valid signature"
        if not any(s.aligned for s in valid):
            return "DKIM signature not aligned with From"
        bad = next(s for s in valid if s.aligned)
        return f"aligned DKIM signature refused: {bad.reason}"

    @staticmethod
    def _parse_ip(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            ip = ipaddress.ip_address(client_ip.strip().strip("[]"))
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    def _message_problems(self, raw: bytes, headers: list[tuple[str, bytes]],
                          from_norm: str) -> list[str]:
        problems = singleton_violations(raw)
        froms = _header_values(headers, "from")
        if len(froms) == 1:
            try:
                header_from = parse_strict_mailbox(_text(froms[0])).address
            except AddressError as exc:
                problems.append(f"From header is not exactly one mailbox: {exc}")
            else:
                if header_from != from_norm:
                    problems.append("From header does not match the given From address")
                senders = _header_values(headers, "sender")
                if len(senders) == 1:
                    try:
                        sender = parse_strict_mailbox(_text(senders[0])).address
                    except AddressError:
                        sender = None
                    if sender != header_from:
                        problems.append("Sender differs from From")
        return problems

    def _check_dkim(self, raw: bytes, from_domain: str,
                    evidence: dict[str, Any]) -> tuple[list[SignatureResult], bool]:
        # dkimpy splits the whole message (a 25 MB copy) when it is built: only build it when
        # there is a signature to check (one in the body is no signature: dkimpy reads the
        # header block only).
        if not _has_header(_DKIM_SIGNATURE_RE, raw):
            return [], False
        temp_log: list[str] = []
        dnsfunc = _dkim_dnsfunc(self.dns_txt, temp_log)
        now = self.clock()
        try:
            verifier = _ClockedDKIM(raw, now=now, minkey=1024,
                                    timeout=self.policy.dns_timeout)
        except dkim.DKIMException as exc:
            evidence["dkim_error"] = str(exc)
            return [], False
        sig_values = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
        counts = _counts(_split_headers(raw))
        results: list[SignatureResult] = []
        any_temp = False
        for idx, value in enumerate(sig_values):
            res = self._check_one(verifier, idx, value, from_domain, dnsfunc, temp_log,
                                  counts)
            any_temp = any_temp or res.temp_error
            results.append(res)
        if temp_log:
            evidence["dkim_dns_temp_errors"] = temp_log
        return results, any_temp

    def _check_one(self, verifier: Any, idx: int, value: bytes, from_domain: str,
                   dnsfunc: Callable[..., bytes | None], temp_log: list[str],
                   counts: dict[str, int]) -> SignatureResult:
        tags = _sig_tags(value) or {}
        domain = _ascii(tags.get(b"d", b"")).lower()
        selector = _ascii(tags.get(b"s", b""))
        b_value = _clean_b64(tags.get(b"b", b""))
        h_list = [x.strip().lower() for x in _ascii(tags.get(b"h", b"")).split(":")]
        _, uncovered = coverage(h_list, counts)
        l_raw = tags.get(b"l")
        limit = int(l_raw) if l_raw is not None and l_raw.isdigit() else None
        res = SignatureResult(
            domain=domain, selector=selector, valid=False,
            aligned=bool(domain) and aligned(domain, from_domain),
            covers_from="from" in h_list, body_length_limit=limit, key_bits=None,
            b_hash=hashlib.sha256(b_value).hexdigest() if b_value else "",
            reason="", body_hash=_ascii(_clean_b64(tags.get(b"bh", b""))),
            algorithm=_ascii(tags.get(b"a", b"")), signed_headers=h_list,
            uncovered=uncovered,
        )
        if not tags:
            res.reason = "unparseable DKIM-Signature"
            return res
        before = len(temp_log)
        # One dkimpy object serves every index; clear the key state of the previous one.
        verifier.ktag, verifier.keysize = None, 0
        try:
            ok = bool(verifier.verify(idx=idx, dnsfunc=dnsfunc))
        except DnsTempError as exc:
            res.temp_error = True
            res.reason = f"temporary DNS failure: {exc}"
            return res
        except dkim.DKIMException as exc:
            res.reason = f"signature refused: {exc}"
            return res
        except Exception as exc:  # dkimpy on hostile input: never let it escape
            res.reason = f"signature refused: {exc.__class__.__name__}: {exc}"
            return res
        if len(temp_log) > before:  # dkimpy swallowed it somewhere: still temporary
            res.temp_error = True
            res.reason = "temporary DNS failure"
            return res
        ktag = getattr(verifier, "ktag", None)
        res.key_bits = 256 if ktag == b"ed25519" else int(getattr(verifier, "keysize", 0) or 0)
        if not ok:
            res.reason = "signature did not verify"
            return res
        res.valid = True
        res.reason = self._strong_refusal(verifier, tags, res) or "ok"
        return res

    def _strong_refusal(self, verifier: Any, tags: dict[bytes, bytes],
                        res: SignatureResult) -> str | None:
        """Why a cryptographically valid signature may not make the message strong."""
        if not res.aligned:
            return "policy: DKIM signature not aligned with From"
        if not res.covers_from:
            return "policy: h= does not cover From"
        if res.uncovered:
            return ("policy: h= does not cover every " + ", ".join(res.uncovered)
                    + " header (present more times than signed, RFC 6376 section 8.15)")
        if res.body_length_limit is not None:
            try:
                policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
                full = len(policy.canonicalize_body(verifier.body))
            except Exception:
                return "policy: l= present and body length unknown"
            if res.body_length_limit != full:
                return (f"policy: l={res.body_length_limit} covers only part of the "
                        f"body ({full} bytes)")
        if (verifier.ktag == b"rsa" and res.key_bits is not None
                and res.key_bits < self.policy.min_rsa_bits):
            return f"policy: RSA key {res.key_bits} bits below {self.policy.min_rsa_bits}"
        return None

    def _check_upstream(self, headers: list[tuple[str, bytes]], from_domain: str,
                        evidence: dict[str, Any]) -> str | None:
        considered: list[dict[str, Any]] = []
        ignored: list[dict[str, Any]] = []
        zone_open = True  # still above the topmost Received or in its A-R block
        seen_received = False
        trusted: dict[str, list[Any]] = {}
        for name, value in headers:
            if name == "received":
                if seen_received:
                    zone_open = False
                seen_received = True
                continue
            if name != "authentication-results":
                if seen_received:
                    zone_open = False  # the A-R block below the topmost Received ended
                continue
            text = _text(value)[:4000]
            sid, parsed, err = _parse_ar(text)
            entry = {"value": text, "authserv_id": sid}
            if sid not in self._trusted_ids:
                ignored.append({**entry, "why": "authserv-id not trusted"})
            elif not zone_open:
                ignored.append({**entry, "why": "below an untrusted Received header "
                                "(possible forgery, RFC 8601 §5)"})
            elif parsed is None:
                ignored.append({**entry, "why": err})
            else:
                considered.append(entry)
                trusted.setdefault(sid, []).append(parsed)
        evidence["authentication_results"] = {"considered": considered, "ignored": ignored}
        for sid, parsed_list in trusted.items():
            summaries = {repr(_ar_summary(p)) for p in parsed_list}
            if len(summaries) > 1:
                evidence["authentication_results"]["conflict"] = sid
                ignored.append({"authserv_id": sid,
                                "why": "conflicting Authentication-Results with the same "
                                       "authserv-id: all ignored"})
                continue
            passed = _ar_passes(parsed_list[0], from_domain)
            if passed:
                return f"trusted Authentication-Results from {sid}: {passed}"
        return None

    def check_signatures(self, raw: bytes, from_domain: str) -> list[SignatureResult]:
        """Every DKIM-Signature of ``raw``, verified (the DKIM part of :meth:`verify`)."""
        signatures, _ = self._check_dkim(raw, from_domain, {})
        return signatures

    def check_arc(self, raw: bytes) -> dict[str, Any]:
        """The ARC chain of ``raw``: ``result`` (pass/fail/none/temperror), ``reason``,
        ``seals`` (ARC-Seal d= newest first) and the raw per-instance results."""
        ev: dict[str, Any] = {}
        self._run_arc(raw, ev)
        return ev

    def _run_arc(self, raw: bytes, ev: dict[str, Any]) -> tuple[Any, list[Any]]:
        temp_log: list[str] = []
        dnsfunc = _dkim_dnsfunc(self.dns_txt, temp_log)
        try:
            cv, results, why = dkim.ARC(raw, minkey=1024).verify(dnsfunc=dnsfunc)
        except DnsTempError as exc:
            ev.update(result="temperror", reason=str(exc))
            return None, []
        except Exception as exc:  # DKIMException and parser errors on hostile input
            ev.update(result="fail", reason=f"{exc.__class__.__name__}: {exc}")
            return None, []
        if temp_log:  # dkimpy swallowed a DNS failure: the chain result is not final
            ev.update(result="temperror", reason="; ".join(temp_log))
            return None, []
        cv_text = cv.decode("ascii") if isinstance(cv, bytes) else str(cv)
        seals = [_ascii(r.get("as-domain", b"")).lower() for r in results]
        ev.update(result=cv_text, reason=str(why), seals=seals)
        return cv, results

    def _check_arc(self, raw: bytes, from_domain: str,
                   evidence: dict[str, Any]) -> tuple[str | None, bool]:
        if not _has_header(_ARC_SEAL_RE, raw):
            return None, False
        ev: dict[str, Any] = {}
        evidence["arc"] = ev
        cv, results = self._run_arc(raw, ev)
        if ev.get("result") == "temperror":
            return None, True
        seals = list(ev.get("seals", []))
        if cv != dkim.CV_Pass:
            return None, False
        untrusted = [d for d in seals if _norm_domain(d) not in self._trusted_sealers]
        if untrusted or not seals:
            ev["ignored"] = f"sealed by untrusted sealer(s): {', '.join(untrusted)}"
            return None, False
        first = next((r for r in results if r.get("instance") == 1), None)
        if first is None:
            return None, False
        aar = _AAR_INSTANCE_RE.sub("", _text(first.get("aar-value", b"")), count=1)
        ev["aar_i1"] = aar[:4000]
        _, parsed, err = _parse_ar(aar)
        if parsed is None:
            ev["ignored"] = f"i=1 ARC-Authentication-Results {err}"
            return None, False
        passed = _ar_passes(parsed, from_domain)
        if passed is None:
            ev["ignored"] = "i=1 ARC-Authentication-Results has no aligned pass"
            return None, False
        # What the last (trusted) hop signed: a header added after it is no one's word.
        headers = _split_headers(raw)
        latest = max(((_arc_instance(v), v) for n, v in headers
                      if n == "arc-message-signature"), default=(0, b""))[1]
        tags = _sig_tags(latest) or {}
        signed = [x.strip().lower() for x in _ascii(tags.get(b"h", b"")).split(":")]
        covered, missing = coverage(signed, _counts(headers))
        if missing:
            ev["ignored"] = ("latest ARC-Message-Signature does not cover every "
                             + ", ".join(missing) + " header (RFC 6376 section 8.15)")
            return None, False
        ev["covered_headers"] = sorted(covered)
        return f"ARC chain sealed by {seals[0]}: {passed}", False

    def _check_spf(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                   mail_from: str, helo: str, from_domain: str,
                   evidence: dict[str, Any]) -> tuple[str | None, bool]:
        if not self.policy.check_spf:
            return None, False
        ev: dict[str, Any] = {}
        evidence["spf"] = ev
        if ip is None or ip.is_loopback or ip.is_unspecified:
            ev["skipped"] = "client IP unknown or local: SPF says nothing here"
            return None, False
        mail_from = mail_from.strip().strip("<>")
        identity = "mailfrom" if mail_from else "helo"
        domain = _domain_of(mail_from) if mail_from else helo.strip()
        norm = _norm_domain(domain) if domain else None
        ev.update(identity=identity, domain=domain)
        if not norm:
            ev["skipped"] = "no usable MAIL FROM or HELO domain"
            return None, False
        # pyspf: i=client IP, s=MAIL FROM, h=HELO; with s empty it checks postmaster@h.
        q = _InjectedSpfQuery(str(ip), mail_from, helo.strip() if mail_from else norm,
                              dns_txt=self.dns_txt, dns_query=self.dns_query,
                              timeout=self.policy.dns_timeout)
        try:
            result, _code, explanation = q.check()
        except Exception as exc:  # pyspf on hostile records: never crash, never pass
            result, explanation = "permerror", f"{exc.__class__.__name__}: {exc}"
        ev.update(result=str(result), explanation=str(explanation))
        if q.unsupported:
            ev["unsupported_lookups"] = q.unsupported
        if result == "temperror":
            return None, True
        if result != "pass":
            return None, False
        if not aligned(norm, from_domain):
            ev["aligned"] = False
            return None, False
        ev["aligned"] = True
        return f"SPF pass for {identity} {norm}, aligned with From", False


def replay_key(raw: bytes, verdict: Verdict | None = None) -> str | None:
    """Key for DKIM replay detection (docs/reliability.md 0.7, B.9 #23).

    sha256 over (Message-ID, the signature's b= hash, its bh=). The signature is the first
    *verified* one of ``verdict`` when given, else the first syntactically usable
    DKIM-Signature. ``None`` when the message carries no usable signature. The same message
    re-sent from another envelope or IP gets the same key; any other message a different
    one, since b= covers its headers."""
    headers = _split_headers(raw)
    msgid = b"".join(_header_values(headers, "message-id")[:1]).strip()
    b_hash = body_hash = ""
    if verdict is not None:
        chosen = next((s for s in verdict.signatures if s.valid), None)
        if chosen is not None:
            b_hash, body_hash = chosen.b_hash, chosen.body_hash
    if not b_hash:
        for value in _header_values(headers, "dkim-signature"):
            tags = _sig_tags(value)
            if tags and tags.get(b"b") and tags.get(b"bh"):
                b_hash = hashlib.sha256(_clean_b64(tags[b"b"])).hexdigest()
                body_hash = _ascii(_clean_b64(tags[b"bh"]))
                break
    if not b_hash:
        return None
    material = b"\x00".join([msgid, b_hash.encode("ascii"), body_hash.encode("ascii")])
    return hashlib.sha256(material).hexdigest()
