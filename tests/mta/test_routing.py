"""Unit tests of ``mta.routing.RoutingTable``: which of dealmail's addresses an RCPT names.

Proves, for the example config (company ``example``, mail domain ``dealmail.localhost``): every
kind of :data:`mta.routing.KINDS` is routed with its parameters (a deal id, a case-sensitive
token, a Postfix user key) and its batchability, and a test fails when a kind is added without
a case here; upper-case and angle-bracketed company addresses are routed (and normalised); an
unknown company, another domain, a disabled kind, an unknown or malformed suffix and malformed
addresses are not ours (None); kinds are data: a table built with another kind routes it; the
user key of ``+received-`` addresses is stable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config

from dealmail.config import Config
from mta.routing import KINDS, AddressKind, RoutingTable, kind_named, mailbox_key

DOMAIN = "dealmail.localhost"
TOKEN = "Ab3_dE-fGhIjKlMnOpQ"  # mixed case: a token is case-sensitive
ALL = tuple(k.name for k in KINDS)
USERKEY = mailbox_key("example", "alice@example.com")

# One address of each kind, with the route it must give: (kind, params, batchable).
EXAMPLES: dict[str, tuple[str, dict[str, str], bool]] = {
    f"example@{DOMAIN}": ("bcc", {}, True),
    f"example+deal42@{DOMAIN}": ("deal", {"deal_id": "42"}, True),
    f"example+ask@{DOMAIN}": ("ask", {}, False),
    f"example+choice-{TOKEN}@{DOMAIN}": ("choice", {"token": TOKEN}, False),
    f"example+sent@{DOMAIN}": ("sent", {}, True),
    f"example+received-{USERKEY}@{DOMAIN}": ("received", {"mailbox": USERKEY}, True),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("routing"))


@pytest.fixture(scope="module")
def table(config: Config) -> RoutingTable:
    return RoutingTable(config, enabled=ALL)


def test_every_kind_has_an_example() -> None:
    assert {kind for kind, _params, _batch in EXAMPLES.values()} == set(ALL)


@pytest.mark.parametrize("address", list(EXAMPLES))
def test_each_kind_is_routed_with_its_parameters(table: RoutingTable, address: str) -> None:
    kind, params, batchable = EXAMPLES[address]
    route = table.route(address)
    assert route is not None
    assert (route.kind, dict(route.params), route.batchable) == (kind, params, batchable)
    assert route.company.slug == "example"
    assert route.address == address.lower()
    assert route.batchable == kind_named(kind).batchable


def test_route_parameters_as_values(table: RoutingTable) -> None:
    deal = table.route(f"example+deal000123@{DOMAIN}")
    assert deal is not None and deal.deal_id == 123 and deal.token is None
    choice = table.route(f"<example+choice-{TOKEN}@{DOMAIN.upper()}>")
    assert choice is not None and (choice.token, choice.deal_id) == (TOKEN, None)
    assert choice.address == f"example+choice-{TOKEN.lower()}@{DOMAIN}"  # compared lower-case


@pytest.mark.parametrize("address", [
    f"EXAMPLE@{DOMAIN.upper()}", f"Example@{DOMAIN}", f"<example@{DOMAIN}>",
    f"  example@{DOMAIN}  ",
])
def test_company_address_in_any_case_is_routed(table: RoutingTable, address: str) -> None:
    route = table.route(address)
    assert route is not None and route.kind == "bcc"
    assert route.address == f"example@{DOMAIN}"


def test_kind_suffix_in_upper_case_is_routed(table: RoutingTable) -> None:
    route = table.route(f"EXAMPLE+DEAL7@{DOMAIN}")
    assert route is not None and (route.kind, route.deal_id) == ("deal", 7)


@pytest.mark.parametrize("address", [
    f"nobody@{DOMAIN}",  # no such company
    f"nobody+deal1@{DOMAIN}",
    "example@example.com",  # another domain: dealmail is no relay here
    f"example@sub.{DOMAIN}",
    f"example+unknown@{DOMAIN}",  # no such kind
    f"example+deal@{DOMAIN}",  # a kind's suffix without its parameter
    f"example+deal12x@{DOMAIN}",
    f"example+deal{'9' * 19}@{DOMAIN}",  # more than 18 digits
    f"example+choice-short@{DOMAIN}",  # a token has at least 16 characters
    f"example+choice-{'a' * 16}!@{DOMAIN}",
    f"example+received-{USERKEY[:11]}@{DOMAIN}",  # a user key has 12 hex digits
    f"example+received-{'g' * 12}@{DOMAIN}",
    f"example+@{DOMAIN}",
    f"example++ask@{DOMAIN}",
    "", "<>", "example", f"@{DOMAIN}", "example@", f"exa mple@{DOMAIN}",
    f"example@{DOMAIN}, other@{DOMAIN}", f"example@{DOMAIN}\r\nRCPT TO:<x@y>",
])
def test_not_ours(table: RoutingTable, address: str) -> None:
    assert table.route(address) is None


def test_disabled_kinds_are_not_routed(config: Config) -> None:
    default = RoutingTable(config)  # bcc and deal only
    assert default.route(f"example+deal5@{DOMAIN}") is not None
    assert default.route(f"example+ask@{DOMAIN}") is None
    assert default.route(f"example+choice-{TOKEN}@{DOMAIN}") is None
    only_ask = RoutingTable(config, enabled=("ask",))
    assert only_ask.route(f"example@{DOMAIN}") is None
    route = only_ask.route(f"example+ask@{DOMAIN}")
    assert route is not None and route.kind == "ask"


def test_kinds_are_data(config: Config) -> None:
    mailbox = AddressKind("mailbox", r"box-(?P<box>[a-z]{1,8})(?:\.(?P<uid>\d+))?",
                          "{slug}+box-<name>@{domain}", "a test kind", batchable=True)
    table = RoutingTable(config, enabled=("bcc", "mailbox"), kinds=(*KINDS, mailbox))
    route = table.route(f"example+box-inbox.7@{DOMAIN}")
    assert route is not None
    assert (route.kind, dict(route.params), route.batchable) == (
        "mailbox", {"box": "inbox", "uid": "7"}, True)
    optional = table.route(f"example+box-sent@{DOMAIN}")
    assert optional is not None and dict(optional.params) == {"box": "sent"}
    # Without a plain kind the company address itself is not routed.
    no_plain = RoutingTable(config, enabled=("deal",), kinds=[kind_named("deal")])
    assert no_plain.route(f"example@{DOMAIN}") is None
    assert no_plain.route(f"example+deal3@{DOMAIN}") is not None


def test_mailbox_key_is_stable_short_and_per_user() -> None:
    # Pinned: the generated Postfix maps carry it, so it must not change between releases.
    assert USERKEY == "4b1f7e561eb1"
    assert mailbox_key("example", "bob@example.com") != USERKEY
    assert mailbox_key("acme", "alice@example.com") != USERKEY


def test_kind_named() -> None:
    assert kind_named("choice").suffix.startswith("choice-")
    with pytest.raises(KeyError):
        kind_named("lmtp")


def test_a_second_company_in_the_config(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "conf" / "dealmail.example.toml").read_text(
        encoding="utf-8")
    second = ('\n[[companies]]\nslug = "acme"\nname = "Acme"\ninternal_domains = ["acme.test"]\n'
              '[[companies.users]]\naddress = "zoe@acme.test"\n')
    path = tmp_path / "two.toml"
    path.write_text(text + second, encoding="utf-8")
    table = RoutingTable(make_config(tmp_path, path=path), enabled=ALL)
    acme, example = table.route(f"acme+ask@{DOMAIN}"), table.route(f"example+ask@{DOMAIN}")
    assert acme is not None and example is not None
    assert (acme.company.slug, example.company.slug) == ("acme", "example")
