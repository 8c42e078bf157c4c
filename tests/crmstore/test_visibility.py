"""Tests for crmstore.visibility, the one rule deciding who sees an email
(docs/architecture.md, rules 6 and 7), as a table of cases run on SQLite and on PostgreSQL.

Company ``example``: alice (admin, shares by default), bob (user, private by default), carol
(user). Company ``other``: olga. Every case builds one email with its sightings and links
straight through the models, then asks both forms of the rule — the SQL condition
:func:`visible_to` used by listings and :func:`can_see` for one email — who may see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from peewee import SqliteDatabase

from crmstore import models as m
from crmstore.db import Store
from crmstore.visibility import can_see, visible_to
from dealmail.config import Config, load_config

CONFIG = """\
[server]
mail_domain = "dealmail.localhost"

[[companies]]
slug = "example"
name = "Example Inc"
internal_domains = ["example.com"]

[[companies.users]]
address = "alice@example.com"
role = "admin"
default_visibility = "shared"

[[companies.users]]
address = "bob@example.com"
default_visibility = "private"

[[companies.users]]
address = "carol@example.com"

[[companies]]
slug = "other"
name = "Other Ltd"
internal_domains = ["other.test"]

[[companies.users]]
address = "olga@other.test"
role = "admin"
"""

USERS = ("alice", "bob", "carol", "olga")
T0 = datetime(2026, 11, 20, 9, 0)


def write_config(folder: Path, text: str = CONFIG) -> Config:
    path = folder / "dealmail.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (f"sqlite:///{tmp_path}/crm.db" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    store = Store(url)
    store.open()
    store.sync_config(write_config(tmp_path))
    yield store
    store.close()


@dataclass
class World:
    """The rows every case starts from, and builders for the case's own rows."""

    users: dict[str, m.User]
    ann: m.Person
    org: m.Organization
    deal: m.Deal
    other_person: m.Person
    counter: int = 0

    def thread(self, company: str = "example", deal: m.Deal | None = None) -> m.Thread:
        return m.Thread.create(company=self.company(company), subject_key="renewal", deal=deal,
                               created_at=T0, last_at=T0)

    def company(self, slug: str) -> int:
        return int(m.Company.get(m.Company.slug == slug).id)

    def email(self, thread: m.Thread | None = None, company: str = "example") -> m.Email:
        self.counter += 1
        thread = thread or self.thread(company)
        return m.Email.create(
            company=self.company(company), dedupe_key=f"<{self.counter}@customer.test>",
            message_id=f"<{self.counter}@customer.test>", content_hash=f"h{self.counter}",
            thread=thread, subject="Renewal", date=T0 + timedelta(hours=self.counter),
            from_address="ann@customer.test", from_name="Ann", raw=b"raw")

    def sight(self, email: m.Email, who: str, visibility: str) -> m.Sighting:
        return m.Sighting.create(
            email=email, user=self.users[who], channel="bcc", visibility=visibility,
            queue_id=f"Q{email.id}{who}", received_at=T0, decisions_json='["secret decision"]')

    def link(self, email: m.Email | None = None, thread: m.Thread | None = None,
             **target: object) -> None:
        m.Link.create(email=email, thread=thread, source="auto", created_at=T0, **target)


@pytest.fixture
def world(store: Store) -> World:
    example = m.Company.get(m.Company.slug == "example")
    other = m.Company.get(m.Company.slug == "other")
    users = {u.address.split("@")[0]: u for u in m.User.select()}
    org = m.Organization.create(company=example, name="Customer Inc")
    ann = m.Person.create(company=example, name="Ann Customer", organization=org)
    m.PersonAddress.create(person=ann, company=example, address="ann@customer.test")
    deal = m.Deal.create(company=example, title="Renewal 2027", person=ann, owner=users["alice"])
    other_person = m.Person.create(company=other, name="Ann at Other")
    m.PersonAddress.create(person=other_person, company=other, address="ann@customer.test")
    return World(users, ann, org, deal, other_person)


# --------------------------------------------------------------------------- the table


def owner_shared_linked_to_person(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "shared")
    w.link(e, person=w.ann)
    return e


def owner_private_linked(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "private")
    w.link(e, person=w.ann)
    w.link(e, deal=w.deal)
    return e


def colleague_private_linked(w: World) -> m.Email:
    """bob's private email: alice is an admin and still does not see it."""
    e = w.email()
    w.sight(e, "bob", "private")
    w.link(e, person=w.ann)
    w.link(e, deal=w.deal)
    return e


def shared_unlinked(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "shared")
    return e


def shared_linked_to_organization_only(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "shared")
    w.link(e, organization=w.org)
    return e


def shared_linked_to_deal(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "bob", "shared")
    w.link(e, deal=w.deal)
    return e


def shared_thread_has_the_deal(w: World) -> m.Email:
    """No link of the email itself: its thread is on the deal."""
    e = w.email(w.thread(deal=w.deal))
    w.sight(e, "alice", "shared")
    return e


def shared_thread_linked_to_deal(w: World) -> m.Email:
    t = w.thread()
    e = w.email(t)
    w.sight(e, "alice", "shared")
    w.link(thread=t, deal=w.deal)
    return e


def shared_thread_linked_to_person(w: World) -> m.Email:
    t = w.thread()
    e = w.email(t)
    w.sight(e, "alice", "shared")
    w.link(thread=t, person=w.ann)
    return e


def private_and_shared_sightings(w: World) -> m.Email:
    """One email seen by bob (private) and alice (shared): the shared sighting decides."""
    e = w.email()
    w.sight(e, "bob", "private")
    w.sight(e, "alice", "shared")
    w.link(e, person=w.ann)
    return e


def two_private_sightings(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "bob", "private")
    w.sight(e, "alice", "private")
    w.link(e, person=w.ann)
    return e


def quarantined(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "quarantined")
    w.link(e, person=w.ann)
    return e


def quarantined_and_private(w: World) -> m.Email:
    e = w.email()
    w.sight(e, "alice", "quarantined")
    w.sight(e, "bob", "private")
    w.link(e, person=w.ann)
    return e


def other_company_shared_linked(w: World) -> m.Email:
    e = w.email(company="other")
    w.sight(e, "olga", "shared")
    w.link(e, person=w.other_person)
    return e


def other_company_thread_on_example_deal(w: World) -> m.Email:
    """A row pointing across tenants (never written by dealmail) still shows nothing."""
    e = w.email(w.thread(company="other", deal=w.deal), company="other")
    w.sight(e, "olga", "shared")
    w.link(e, person=w.ann)
    return e


CASES: list[tuple[Callable[[World], m.Email], set[str]]] = [
    (owner_shared_linked_to_person, {"alice", "bob", "carol"}),
    (owner_private_linked, {"alice"}),
    (colleague_private_linked, {"bob"}),
    (shared_unlinked, {"alice"}),
    (shared_linked_to_organization_only, {"alice"}),
    (shared_linked_to_deal, {"alice", "bob", "carol"}),
    (shared_thread_has_the_deal, {"alice", "bob", "carol"}),
    (shared_thread_linked_to_deal, {"alice", "bob", "carol"}),
    (shared_thread_linked_to_person, {"alice", "bob", "carol"}),
    (private_and_shared_sightings, {"alice", "bob", "carol"}),
    (two_private_sightings, {"alice", "bob"}),
    (quarantined, set()),
    (quarantined_and_private, {"bob"}),
    (other_company_shared_linked, {"olga"}),
    (other_company_thread_on_example_deal, {"olga"}),
]


@pytest.mark.parametrize(("build", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
def test_visibility_table(
    world: World, build: Callable[[World], m.Email], expected: set[str],
) -> None:
    decoy = owner_shared_linked_to_person(world)  # another email, visible to example's users
    email = build(world)
    by_can_see = {name for name in USERS if can_see(world.users[name], email.id)}
    assert by_can_see == expected
    for name in USERS:
        listed = {e.id for e in m.Email.select(m.Email.id).where(visible_to(world.users[name]))}
        assert (email.id in listed) == (name in expected), name
        assert (decoy.id in listed) == (name != "olga"), name


def test_the_table_covers_the_cases_the_issue_lists() -> None:
    """The table covers what the issue lists: an admin refused a colleague's private email,
    a shared but unlinked email, a thread-only deal link, another company, quarantine."""
    names = {c[0].__name__: c[1] for c in CASES}
    assert "alice" not in names["colleague_private_linked"]
    assert names["shared_unlinked"] == {"alice"}
    assert "carol" in names["shared_thread_has_the_deal"]
    assert names["quarantined"] == set()
    assert all("olga" not in seen for name, seen in names.items()
               if not name.startswith("other_company"))


def world_is_sqlite() -> bool:
    return isinstance(m.Sighting._meta.database, SqliteDatabase)


def test_every_visibility_value_fits_its_column() -> None:
    assert m.Sighting.visibility.max_length >= max(map(len, ("shared", "private",
                                                             "quarantined")))


# --------------------------------------------------------------------------- config changes


def test_changing_default_visibility_never_rewrites_stored_sightings(
    store: Store, world: World, tmp_path: Path,
) -> None:
    e = world.email()
    world.sight(e, "bob", "private")
    world.link(e, person=world.ann)
    assert not can_see(world.users["alice"], e.id)

    # bob now shares by default, alice keeps hers private: sync the new config.
    changed = CONFIG.replace('default_visibility = "private"', 'default_visibility = "shared"')
    changed = changed.replace('role = "admin"\ndefault_visibility = "shared"',
                              'role = "admin"\ndefault_visibility = "private"')
    (tmp_path / "new").mkdir()
    new_config = write_config(tmp_path / "new", changed)
    bob = new_config.companies[0].user("bob@example.com")
    assert bob is not None and bob.default_visibility == "shared"
    store.sync_config(new_config)

    assert m.Sighting.get(m.Sighting.email == e.id).visibility == "private"
    assert not can_see(world.users["alice"], e.id)
    assert not can_see(world.users["carol"], e.id)
    assert can_see(world.users["bob"], e.id)
    assert {u.address for u in m.User.select().where(m.User.active)} == {
        "alice@example.com", "bob@example.com", "carol@example.com", "olga@other.test"}


def test_new_sightings_take_the_new_default(store: Store, world: World, tmp_path: Path) -> None:
    """The same change, through the code that stores mail: the old email stays private, the
    next one is shared."""
    from dealmail.addresses import Mailbox
    from dealmail.config import load_config as load
    from linking.record import Arrival, Directory, Original, record_email

    def receive(config: Config, n: int) -> int:
        company = config.companies[0]
        user = company.user("bob@example.com")
        assert user is not None
        original = Original(
            from_=Mailbox("bob@example.com", "Bob"), to=[Mailbox("ann@customer.test", "Ann")],
            cc=[], subject=f"Offer {n}", date=T0 + timedelta(days=n), message_id=f"<{n}@ex>",
            in_reply_to=None, references=[], thread_index=None, snippet="Hello",
            attachments=[], content_hash=f"c{n}")
        arrival = Arrival(user=user, company=company, channel="bcc", queue_id=f"Q{n}",
                            received_at=T0 + timedelta(days=n))
        with store.transaction():
            result = record_email(config, Directory(config), original, b"raw", arrival)
        return result.email_id

    old_config = write_config(tmp_path)
    first = receive(old_config, 1)
    path = tmp_path / "dealmail.toml"
    path.write_text(CONFIG.replace('default_visibility = "private"',
                                   'default_visibility = "shared"'), encoding="utf-8")
    new_config = load(path)
    store.sync_config(new_config)
    second = receive(new_config, 2)
    visibility = {s.email_id: s.visibility for s in m.Sighting.select()}
    assert visibility == {first: "private", second: "shared"}
    assert not can_see(world.users["carol"], first)
    assert can_see(world.users["carol"], second)
