"""Where to deliver mail for a domain: MX lookup turned into an ordered list of routes.

The outbox worker calls :func:`resolve_routes` for a recipient domain when no smarthost is
configured, then hands the routes to :func:`mta.relay.delivery.deliver`, which tries them in
order. DNS is injected (two plain callables), so tests need no network; the
:func:`dnspython_mx_lookup` / :func:`dnspython_addr_lookup` factories adapt dnspython for
production.

Rules (docs/reliability.md D.6.5):

* MX hosts in preference order (RFC 5321 §5.1). Among equal preferences RFC 5321 asks for
  randomisation; we sort by name instead so that an attempt is reproducible and a log line
  can be replayed (spreading load is the destination's business, and retries vary anyway).
* A null MX (RFC 7505: a single MX of preference 0 with host ".") means "this domain accepts
  no mail": :class:`NullMX`, permanent, status 5.1.10.
* No MX record: the implicit MX is the domain itself when it has an A or AAAA record
  (RFC 5321 §5.1); otherwise :class:`NoRoute`, permanent (5.1.2).
* NXDOMAIN: :class:`NoRoute`, permanent (5.1.2). SERVFAIL / timeout: :class:`NoRoute`,
  temporary (4.4.3), so the message is deferred and retried.
* An MX host without any address is skipped (RFC 5321 §5.1); if every MX host is unusable
  the result is permanent when each failed for good, temporary when any lookup may recover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dns.exception
import dns.resolver

from dealmail.addresses import AddressError, normalize_domain
from mta.relay.delivery import NextHop

__all__ = [
    "AddrLookup",
    "LookupNxDomain",
    "LookupTemporary",
    "MxLookup",
    "NoRoute",
    "NullMX",
    "RouteError",
    "dnspython_addr_lookup",
    "dnspython_mx_lookup",
    "resolve_routes",
]

# mx_lookup(domain) -> [(preference, exchange host)]; [] when the domain has no MX records.
MxLookup = Callable[[str], list[tuple[int, str]]]
# addr_lookup(host) -> list of IPv4/IPv6 addresses; [] when the name has no A/AAAA.
AddrLookup = Callable[[str], list[str]]


class LookupNxDomain(Exception):
    """Raised by a lookup when the name does not exist (NXDOMAIN)."""


class LookupTemporary(Exception):
    """Raised by a lookup on SERVFAIL, timeout or no reachable name server."""


class RouteError(Exception):
    """No route to a domain. ``permanent`` says whether to bounce or to retry later;
    ``status`` is the RFC 3463 enhanced code for the DSN."""

    def __init__(self, domain: str, reason: str, *, permanent: bool, status: str) -> None:
        super().__init__(f"{domain}: {reason}")
        self.domain = domain
        self.reason = reason
        self.permanent = permanent
        self.status = status


class NullMX(RouteError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    def __init__(self, domain: str) -> None:
        super().__init__(domain, "domain does not accept mail (null MX, RFC 7505)",
                         permanent=True, status="5.1.10")


class NoRoute(RouteError):
    """No MX and no address, NXDOMAIN, or a DNS failure (see ``permanent``)."""


def _clean_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def resolve_routes(
    domain: str,
    mx_lookup: MxLookup,
    addr_lookup: AddrLookup,
    port: int = 25,
    tls: str = "opportunistic",
) -> list[NextHop]:
    """Ordered routes for ``domain``; raise :class:`RouteError` when there is none."""
    try:
        name = normalize_domain(domain)
    except AddressError as exc:
        raise NoRoute(domain, f"invalid domain: {exc}", permanent=True, status="5.1.2") from exc
    if name.startswith("["):
        # RFC 5321 §4.1.3 address literal: no DNS, connect to the literal itself.
        return [NextHop(name[1:-1].removeprefix("IPv6:").removeprefix("ipv6:"), port, tls=tls)]

    try:
        records = mx_lookup(name)
    except LookupNxDomain as exc:
        raise NoRoute(name, "domain does not exist (NXDOMAIN)", permanent=True,
                      status="5.1.2") from exc
    except LookupTemporary as exc:
        raise NoRoute(name, f"MX lookup failed temporarily: {exc}", permanent=False,
                      status="4.4.3") from exc

    if not records:
        _require_address(name, addr_lookup)
        return [NextHop(name, port, tls=tls)]

    hosts = [(pref, _clean_host(host)) for pref, host in records]
    if all(host == "" for _, host in hosts):
        # RFC 7505 §3: "." (empty after stripping the root) is the null MX.
        raise NullMX(name)
    # RFC 7505 §3 forbids mixing a null MX with others; if someone does, use the real ones.
    ordered = sorted({(pref, host) for pref, host in hosts if host})

    routes: list[NextHop] = []
    seen: set[str] = set()
    temporary: list[str] = []
    for _, host in ordered:
        if host in seen:
            continue
        seen.add(host)
        try:
            addresses = addr_lookup(host)
        except LookupNxDomain:
            continue
        except LookupTemporary as exc:
            # Keep the host: the connection attempt resolves it again and may succeed.
            temporary.append(f"{host}: {exc}")
            routes.append(NextHop(host, port, tls=tls))
            continue
        if addresses:
            routes.append(NextHop(host, port, tls=tls))
    if not routes:
        raise NoRoute(name, "no MX host has an address", permanent=True, status="5.4.4")
    return routes


def _require_address(name: str, addr_lookup: AddrLookup) -> None:
    """Implicit MX check; raise NoRoute for a domain with neither MX nor address."""
    try:
        addresses = addr_lookup(name)
    except LookupNxDomain as exc:
        raise NoRoute(name, "domain does not exist (NXDOMAIN)", permanent=True,
                      status="5.1.2") from exc
    except LookupTemporary as exc:
        raise NoRoute(name, f"address lookup failed temporarily: {exc}", permanent=False,
                      status="4.4.3") from exc
    if not addresses:
        raise NoRoute(name, "no MX record and no address (RFC 5321 §5.1)", permanent=True,
                      status="5.1.2")


# NXDOMAIN is an answer; these mean "could not get an answer now".
_DNS_TEMPORARY = (
    dns.resolver.NoNameservers,
    dns.exception.Timeout,
    dns.resolver.YXDOMAIN,
)


def _resolver(resolver: Any | None) -> Any:
    return resolver if resolver is not None else dns.resolver.Resolver()


def dnspython_mx_lookup(resolver: Any | None = None) -> MxLookup:
    """An :data:`MxLookup` on a dnspython ``Resolver`` (or anything with ``.resolve``)."""
    res = _resolver(resolver)

    def lookup(domain: str) -> list[tuple[int, str]]:
        try:
            answer = res.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise LookupNxDomain(str(exc)) from exc
        except dns.resolver.NoAnswer:
            return []
        except _DNS_TEMPORARY as exc:
            raise LookupTemporary(str(exc)) from exc
        return [(int(r.preference), str(r.exchange)) for r in answer]

    return lookup


def dnspython_addr_lookup(resolver: Any | None = None) -> AddrLookup:
    """An :data:`AddrLookup` (A then AAAA) on a dnspython ``Resolver``."""
    res = _resolver(resolver)

    def lookup(host: str) -> list[str]:
        found: list[str] = []
        failures: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = res.resolve(host, rdtype)
            except dns.resolver.NXDOMAIN as exc:
                raise LookupNxDomain(str(exc)) from exc
            except dns.resolver.NoAnswer:
                continue
            except _DNS_TEMPORARY as exc:
                failures.append(f"{rdtype}: {exc}")
                continue
            found.extend(str(r.address) for r in answer)
        if not found and failures:
            raise LookupTemporary("; ".join(failures))
        return found

    return lookup
