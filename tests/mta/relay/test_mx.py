"""Tests for mta.relay.mx: route resolution with injected DNS (docs/reliability.md D.6.5).

No network: MX and address lookups are dict-backed callables, and the dnspython adapters are
driven by a fake resolver object that raises dnspython's own exception types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import pytest

from mta.relay.mx import (
    LookupNxDomain,
    LookupTemporary,
    NoRoute,
    NullMX,
    RouteError,
    dnspython_addr_lookup,
    dnspython_mx_lookup,
    resolve_routes,
)

NX = object()
TEMP = object()


def mx_from(table: Mapping[str, Any]) -> Any:
    def lookup(domain: str) -> list[tuple[int, str]]:
        value = table.get(domain, NX)
        if value is NX:
            raise LookupNxDomain(domain)
        if value is TEMP:
            raise LookupTemporary("SERVFAIL")
        return list(value)

    return lookup


def addr_from(table: Mapping[str, Any]) -> Any:
    def lookup(host: str) -> list[str]:
        value = table.get(host, NX)
        if value is NX:
            raise LookupNxDomain(host)
        if value is TEMP:
            raise LookupTemporary("timeout")
        return list(value)

    return lookup


ADDRS = {
    "mx1.customer.test": ["192.0.2.1"],
    "mx2.customer.test": ["192.0.2.2"],
    "a.backup.test": ["192.0.2.3"],
    "b.backup.test": ["2001:db8::1"],
    "customer.test": ["192.0.2.9"],
    "noaddr.customer.test": [],
}


def hosts(domain: str, mx: Mapping[str, Any], addrs: Mapping[str, Any] = ADDRS) -> list[str]:
    return [r.host for r in resolve_routes(domain, mx_from(mx), addr_from(addrs))]


def test_preference_order_then_name() -> None:
    mx = {"customer.test": [(20, "b.backup.test."), (10, "MX2.customer.test."),
                            (20, "a.backup.test."), (5, "mx1.customer.test.")]}
    assert hosts("customer.test", mx) == [
        "mx1.customer.test", "mx2.customer.test", "a.backup.test", "b.backup.test"]


def test_routes_carry_port_and_tls_policy() -> None:
    one_mx = mx_from({"customer.test": [(10, "mx1.customer.test")]})
    routes = resolve_routes("customer.test", one_mx, addr_from(ADDRS), port=2525, tls="required")
    assert [(r.host, r.port, r.tls) for r in routes] == [("mx1.customer.test", 2525, "required")]
    default = resolve_routes("customer.test",
                             mx_from({"customer.test": [(10, "mx1.customer.test")]}),
                             addr_from(ADDRS))
    assert (default[0].port, default[0].tls) == (25, "opportunistic")


def test_duplicate_hosts_collapse() -> None:
    mx = {"customer.test": [(10, "mx1.customer.test."), (10, "mx1.customer.test"),
                            (20, "mx1.customer.test")]}
    assert hosts("customer.test", mx) == ["mx1.customer.test"]


def test_domain_is_normalised() -> None:
    mx = {"customer.test": [(10, "mx1.customer.test")]}
    assert hosts("Customer.TEST.", mx) == ["mx1.customer.test"]


def test_null_mx_is_permanent_5_1_10() -> None:
    with pytest.raises(NullMX) as info:
        hosts("customer.test", {"customer.test": [(0, ".")]})
    assert info.value.permanent and info.value.status == "5.1.10"
    assert isinstance(info.value, RouteError)


def test_null_mx_mixed_with_real_mx_uses_real_ones() -> None:
    assert hosts("customer.test", {"customer.test": [(0, "."), (10, "mx1.customer.test")]}) \
        == ["mx1.customer.test"]


def test_implicit_mx_when_no_mx_records() -> None:
    assert hosts("customer.test", {"customer.test": []}) == ["customer.test"]


def test_no_mx_and_no_address_is_permanent() -> None:
    with pytest.raises(NoRoute) as info:
        hosts("noaddr.customer.test", {"noaddr.customer.test": []})
    assert info.value.permanent and info.value.status == "5.1.2"


def test_nxdomain_is_permanent() -> None:
    with pytest.raises(NoRoute) as info:
        hosts("nowhere.test", {})
    assert info.value.permanent and info.value.status == "5.1.2"
    assert "NXDOMAIN" in str(info.value)


def test_servfail_is_temporary() -> None:
    with pytest.raises(NoRoute) as info:
        hosts("customer.test", {"customer.test": TEMP})
    assert not info.value.permanent and info.value.status.startswith("4.")


def test_implicit_mx_address_timeout_is_temporary() -> None:
    with pytest.raises(NoRoute) as info:
        hosts("customer.test", {"customer.test": []}, {"customer.test": TEMP})
    assert not info.value.permanent


def test_mx_hosts_without_address_are_skipped() -> None:
    mx = {"customer.test": [(5, "noaddr.customer.test"), (7, "gone.customer.test"),
                            (10, "mx2.customer.test")]}
    assert hosts("customer.test", mx) == ["mx2.customer.test"]


def test_mx_host_with_temporary_address_failure_is_kept() -> None:
    mx = {"customer.test": [(5, "slow.customer.test"), (10, "mx2.customer.test")]}
    addrs = {**ADDRS, "slow.customer.test": TEMP}
    assert hosts("customer.test", mx, addrs) == ["slow.customer.test", "mx2.customer.test"]


def test_every_mx_host_without_address_is_permanent() -> None:
    mx = {"customer.test": [(5, "noaddr.customer.test"), (7, "gone.customer.test")]}
    with pytest.raises(NoRoute) as info:
        hosts("customer.test", mx)
    assert info.value.permanent


def test_address_literal_needs_no_dns() -> None:
    def no_dns(name: str) -> Any:
        raise AssertionError("no lookup expected")

    routes = resolve_routes("[192.0.2.7]", no_dns, no_dns)
    assert [r.host for r in routes] == ["192.0.2.7"]


# -- dnspython adapters with a fake resolver ------------------------------------------------

@dataclass
class _MX:
    preference: int
    exchange: str


@dataclass
class _A:
    address: str


class FakeResolver:
    def __init__(self, answers: Mapping[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    def resolve(self, name: str, rdtype: str) -> Any:
        self.asked.append((name, rdtype))
        value = self.answers.get((name, rdtype))
        if isinstance(value, BaseException):
            raise value
        if value is None:
            raise dns.resolver.NoAnswer()
        return value


def test_dnspython_mx_lookup() -> None:
    res = FakeResolver({
        ("customer.test", "MX"): [_MX(10, "mx1.customer.test."), _MX(0, "mx0.customer.test.")],
        ("nx.test", "MX"): dns.resolver.NXDOMAIN(),
        ("slow.test", "MX"): dns.exception.Timeout(),
        ("broken.test", "MX"): dns.resolver.NoNameservers(),
    })
    lookup = dnspython_mx_lookup(res)
    assert lookup("customer.test") == [(10, "mx1.customer.test."), (0, "mx0.customer.test.")]
    assert lookup("nomx.test") == []
    with pytest.raises(LookupNxDomain):
        lookup("nx.test")
    with pytest.raises(LookupTemporary):
        lookup("slow.test")
    with pytest.raises(LookupTemporary):
        lookup("broken.test")


def test_dnspython_addr_lookup() -> None:
    res = FakeResolver({
        ("both.test", "A"): [_A("192.0.2.1")],
        ("both.test", "AAAA"): [_A("2001:db8::1")],
        ("v6.test", "AAAA"): [_A("2001:db8::2")],
        ("nx.test", "A"): dns.resolver.NXDOMAIN(),
        ("half.test", "A"): dns.exception.Timeout(),
        ("half.test", "AAAA"): [_A("2001:db8::3")],
        ("down.test", "A"): dns.exception.Timeout(),
        ("down.test", "AAAA"): dns.exception.Timeout(),
    })
    lookup = dnspython_addr_lookup(res)
    assert lookup("both.test") == ["192.0.2.1", "2001:db8::1"]
    assert lookup("v6.test") == ["2001:db8::2"]
    assert lookup("none.test") == []
    assert lookup("half.test") == ["2001:db8::3"]
    with pytest.raises(LookupNxDomain):
        lookup("nx.test")
    with pytest.raises(LookupTemporary):
        lookup("down.test")


def test_resolve_routes_end_to_end_with_dnspython_adapters() -> None:
    res = FakeResolver({
        ("customer.test", "MX"): [_MX(20, "mx2.customer.test."), _MX(10, "mx1.customer.test.")],
        ("mx1.customer.test", "A"): [_A("192.0.2.1")],
        ("mx2.customer.test", "A"): [_A("192.0.2.2")],
        ("null.test", "MX"): [_MX(0, ".")],
    })
    routes = resolve_routes("customer.test", dnspython_mx_lookup(res), dnspython_addr_lookup(res))
    assert [r.host for r in routes] == ["mx1.customer.test", "mx2.customer.test"]
    with pytest.raises(NullMX):
        resolve_routes("null.test", dnspython_mx_lookup(res), dnspython_addr_lookup(res))
