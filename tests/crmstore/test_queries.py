"""Tests for crmstore.queries through ``dealmail conversations``: the documented JSON
shape, newest first, only what the reader may see (another user's private sighting is
neither listed nor described), and clear errors for an unknown user, person or deal.

The demo CSVs are imported with :func:`crmstore.importing.import_csv`; the emails, sightings
and links are written straight through the models, so these tests depend on no parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from crmstore.db import Store
from crmstore.importing import import_csv
from crmstore.queries import NotFound, conversations, find_deal, find_person, find_user
from dealmail import cli
from dealmail.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
DEMO = ROOT / "conf" / "demo"

# A third user of company example (the example's last block), a colleague of alice and bob.
CAROL = '\n[[companies.users]]\naddress = "carol@example.com"\nname = "Carol"\n'

EMAIL_KEYS = {"id", "handle", "message_id", "date", "subject", "from", "to", "cc", "channel",
              "owner", "visibility", "snippet"}


pytestmark = pytest.mark.usefixtures("restore_logging")


@dataclass
class Demo:
    conf: Path
    url: str
    ids: dict[str, int]


def _email(ids: dict[str, int], name: str, thread: m.Thread, subject: str, when: datetime,
           sender: tuple[str, str], to: list[dict[str, str]], snippet: str) -> m.Email:
    email = m.Email.create(
        company=thread.company_id, dedupe_key=f"<{name}@test>", message_id=f"<{name}@test>",
        content_hash=name, thread=thread, subject=subject, date=when,
        from_address=sender[0], from_name=sender[1], to_json=json.dumps(to),
        cc_json=json.dumps([{"address": "carol@example.com", "name": "Carol"}]),
        snippet=snippet, raw=b"raw")
    ids[name] = email.id
    return email


def _sight(email: m.Email, user: str, visibility: str, channel: str) -> None:
    m.Sighting.create(email=email, user=m.User.get(m.User.address == user), channel=channel,
                      visibility=visibility, queue_id=f"Q{email.id}{user[:3]}",
                      received_at=email.date, decisions_json='["private reasoning"]')


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """The example config and demo CSVs, plus conversations with Ann:

    * thread "renewal" on deal Renewal 2027: ann -> alice (alice, shared), then alice's answer
      (alice, shared), the newest of the thread;
    * thread "discount": bob's private note to ann (bob, private);
    * thread "seats", the newest: bob bcc'd it privately and alice shared it too;
    * thread "pilot": carl, on deal Pilot only through its thread.
    """
    conf = tmp_path / "dealmail.toml"
    conf.write_text(EXAMPLE.read_text(encoding="utf-8") + CAROL, encoding="utf-8")
    url = f"sqlite:///{tmp_path}/crm.db"
    config = load_config(conf, [f"database.url={url}"])
    store = Store(url)
    store.open()
    store.sync_config(config)
    for kind in ("organizations", "persons", "deals"):
        import_csv(store, "example", kind, DEMO / f"{kind}.csv")
    ids: dict[str, int] = {}
    company = store.company_id("example")
    ann = m.PersonAddress.get(m.PersonAddress.address == "ann@customer.test").person_id
    carl = m.PersonAddress.get(m.PersonAddress.address == "carl@other.test").person_id
    renewal = m.Deal.get(m.Deal.title == "Renewal 2027")
    pilot = m.Deal.get(m.Deal.title == "Pilot")
    ids.update(ann=ann, renewal=renewal.id, pilot=pilot.id)
    ann_box = [{"address": "ann@customer.test", "name": "Ann Customer"}]
    alice_box = [{"address": "alice@example.com", "name": "Alice Admin"}]
    with store.transaction():
        def thread(key: str, deal: m.Deal | None = None) -> m.Thread:
            t = m.Thread.create(company=company, subject_key=key, deal=deal,
                                created_at=datetime(2026, 11, 1), last_at=datetime(2026, 11, 1))
            ids[f"t_{key}"] = t.id
            return t

        t = thread("renewal", renewal)
        e = _email(ids, "r1", t, "Renewal", datetime(2026, 11, 2, 9, 0),
                   ("ann@customer.test", "Ann Customer"), alice_box, "Can we renew?")
        _sight(e, "alice@example.com", "shared", "forward")
        m.Link.create(email=e, person=ann, source="auto")
        m.Link.create(email=e, deal=renewal, source="choice")
        e = _email(ids, "r2", t, "Re: Renewal", datetime(2026, 11, 4, 9, 0),
                   ("alice@example.com", "Alice Admin"), ann_box, "Yes, here is the offer")
        _sight(e, "alice@example.com", "shared", "bcc")
        m.Link.create(email=e, person=ann, source="auto")
        m.Link.create(email=e, deal=renewal, source="thread")

        t = thread("discount")
        e = _email(ids, "d1", t, "Discount", datetime(2026, 11, 3, 9, 0),
                   ("bob@example.com", "Bob Seller"), ann_box, "Between us: 20% off")
        _sight(e, "bob@example.com", "private", "relay")
        m.Link.create(email=e, person=ann, source="auto")

        t = thread("seats")
        e = _email(ids, "s1", t, "More seats", datetime(2026, 11, 5, 9, 0),
                   ("ann@customer.test", "Ann Customer"),
                   [{"address": "bob@example.com", "name": "Bob"}, *alice_box], "Ten more?")
        _sight(e, "bob@example.com", "private", "imap")
        _sight(e, "alice@example.com", "shared", "bcc")
        m.Link.create(email=e, person=ann, source="auto")

        t = thread("pilot", pilot)
        e = _email(ids, "p1", t, "Pilot", datetime(2026, 11, 6, 9, 0),
                   ("carl@other.test", "Carl Other"), alice_box, "Pilot start date")
        _sight(e, "alice@example.com", "shared", "bcc")
        m.Link.create(email=e, person=carl, source="auto")
    store.close()
    yield Demo(conf, url, ids)


def run(demo: Demo, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["conversations", *argv, "--config", str(demo.conf), "--set",
                     f"database.url={demo.url}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def as_json(demo: Demo, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(demo, capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def shape(result: Any) -> list[tuple[int, list[int]]]:
    return [(t["id"], [e["id"] for e in t["emails"]]) for t in result["threads"]]


# --------------------------------------------------------------------------- JSON output


def test_conversations_json_keys_and_values(
    demo: Demo, capsys: pytest.CaptureFixture[str],
) -> None:
    result = as_json(demo, capsys, "--as", "alice@example.com", "--person", "ann@customer.test")
    ids = demo.ids
    # Newest first: threads by their newest email, emails newest first in each thread.
    assert shape(result) == [(ids["t_seats"], [ids["s1"]]),
                             (ids["t_renewal"], [ids["r2"], ids["r1"]])]
    for thread in result["threads"]:
        assert {"id", "subject", "deal", "emails"} <= set(thread)
        for email in thread["emails"]:
            assert set(email) >= EMAIL_KEYS
            assert set(email["from"]) == {"address", "name"}
    seats, renewal = result["threads"]
    assert seats["deal"] is None and seats["subject"] == "More seats"
    assert renewal["deal"] == {"id": ids["renewal"], "title": "Renewal 2027"}
    assert renewal["subject"] == "Re: Renewal"
    r2, r1 = renewal["emails"]
    assert r1 == {**r1, "id": ids["r1"], "message_id": "<r1@test>",
                  "date": "2026-11-02T09:00:00Z", "subject": "Renewal",
                  "from": {"address": "ann@customer.test", "name": "Ann Customer"},
                  "to": [{"address": "alice@example.com", "name": "Alice Admin"}],
                  "cc": [{"address": "carol@example.com", "name": "Carol"}],
                  "channel": "forward", "owner": "alice@example.com", "visibility": "shared",
                  "snippet": "Can we renew?"}
    assert (r2["date"], r2["channel"], r2["from"]["address"]) == (
        "2026-11-04T09:00:00Z", "bcc", "alice@example.com")
    # alice may not see bob's private "Discount" email, nor learn that it exists.
    assert "hidden" not in result
    assert "Discount" not in json.dumps(result) and "20% off" not in json.dumps(result)


def test_the_owner_sees_their_private_email_with_their_own_sighting(
    demo: Demo, capsys: pytest.CaptureFixture[str],
) -> None:
    result = as_json(demo, capsys, "--as", "bob@example.com", "--person", "ann@customer.test")
    ids = demo.ids
    assert shape(result) == [(ids["t_seats"], [ids["s1"]]),
                             (ids["t_renewal"], [ids["r2"], ids["r1"]]),
                             (ids["t_discount"], [ids["d1"]])]
    seats = result["threads"][0]["emails"][0]
    assert (seats["owner"], seats["visibility"], seats["channel"]) == (
        "bob@example.com", "private", "imap")
    discount = result["threads"][2]["emails"][0]
    assert (discount["owner"], discount["visibility"], discount["snippet"]) == (
        "bob@example.com", "private", "Between us: 20% off")


def test_a_colleague_sees_the_shared_sighting_never_the_private_one(
    demo: Demo, capsys: pytest.CaptureFixture[str],
) -> None:
    """carol sees "More seats" through alice's shared sighting; bob's private sighting of
    it (his channel, his decisions) is not described, and his private email not listed."""
    result = as_json(demo, capsys, "--as", "carol@example.com", "--person", "ann@customer.test")
    ids = demo.ids
    assert shape(result) == [(ids["t_seats"], [ids["s1"]]),
                             (ids["t_renewal"], [ids["r2"], ids["r1"]])]
    seats = result["threads"][0]["emails"][0]
    assert (seats["owner"], seats["visibility"], seats["channel"]) == (
        "alice@example.com", "shared", "bcc")
    assert seats.get("decisions", []) == []
    text = json.dumps(result)
    assert "imap" not in text and "private" not in text and "Discount" not in text


def test_conversations_of_a_deal_include_emails_linked_only_by_their_thread(
    demo: Demo, capsys: pytest.CaptureFixture[str],
) -> None:
    ids = demo.ids
    result = as_json(demo, capsys, "--as", "bob@example.com", "--deal", str(ids["pilot"]))
    assert shape(result) == [(ids["t_pilot"], [ids["p1"]])]
    assert result["threads"][0]["deal"] == {"id": ids["pilot"], "title": "Pilot"}
    renewal = as_json(demo, capsys, "--as", "carol@example.com", "--deal", str(ids["renewal"]))
    assert shape(renewal) == [(ids["t_renewal"], [ids["r2"], ids["r1"]])]


def test_a_person_without_emails(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    result = as_json(demo, capsys, "--as", "alice@example.com", "--person", "dora@customer.test")
    assert result == {"threads": []}


def test_text_output(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(demo, capsys, "--as", "carol@example.com", "--person",
                       "ANN@customer.test")
    assert code == 0
    assert out.startswith("Conversations of person ANN@customer.test as seen by "
                          "carol@example.com:")
    assert out.index("More seats") < out.index("Re: Renewal") < out.index("Can we renew?")
    assert "deal #" in out and "Renewal 2027" in out
    assert "may not see" not in out and "20% off" not in out


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--as", "mallory@example.com", "--person", "ann@customer.test"],
         "unknown user 'mallory@example.com'"),
        (["--as", "alice@example.com", "--person", "nobody@customer.test"],
         "no person with address 'nobody@customer.test'"),
        (["--as", "alice@example.com", "--deal", "9999"], "no deal 9999"),
    ],
)
def test_unknown_user_person_or_deal_is_a_clear_error(
    demo: Demo, capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
) -> None:
    code, out, err = run(demo, capsys, *argv, "--json")
    assert code == 67
    assert out == ""
    assert err.strip() == f"dealmail: {message}"


def test_a_user_no_longer_in_the_config_is_unknown(
    demo: Demo, capsys: pytest.CaptureFixture[str],
) -> None:
    """bob removed from the config stays in the database (rows point at him) but inactive:
    he can no longer read anything."""
    text = demo.conf.read_text(encoding="utf-8")
    bob = text.index('[[companies.users]]\naddress = "bob@example.com"')
    carol = text.index(CAROL)
    demo.conf.write_text(text[:bob] + text[carol:], encoding="utf-8")
    code, out, err = run(demo, capsys, "--as", "bob@example.com", "--person",
                         "ann@customer.test")
    assert (code, out) == (67, "")
    assert "unknown user 'bob@example.com'" in err


def test_query_functions_raise_not_found(demo: Demo) -> None:
    store = Store(demo.url)
    store.open()
    try:
        company = store.company_id("example")
        alice = find_user(" Alice@Example.com ")
        assert alice.role == "admin"
        assert find_person(company, "ann@customer.test").id == demo.ids["ann"]
        assert find_deal(company, demo.ids["renewal"]).title == "Renewal 2027"
        with pytest.raises(NotFound):
            find_user("alice.personal@nowhere.test")
        with pytest.raises(NotFound):
            find_person(company + 1, "ann@customer.test")  # another company's person
        with pytest.raises(NotFound):
            find_deal(company + 1, demo.ids["renewal"])
        result = conversations(alice, person=find_person(company, "ann@customer.test"))
        assert [t["id"] for t in result["threads"]] == [demo.ids["t_seats"],
                                                         demo.ids["t_renewal"]]
    finally:
        store.close()
