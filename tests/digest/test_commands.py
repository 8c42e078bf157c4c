"""Commands about a user's own emails: reading them (English, Japanese, full-width, several per
mail, typos, prose and quoted text), the answer that says what became of each, and the
action links of digests and answers (well-formed RFC 6068 ``mailto:`` URIs whose subject is a
command the parser reads back)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from digest_world import T0, World, after, make_world

from crmstore import models as m
from digest.actions import mailto
from digest.ask import Request, answer_mail, parse_mail, render_answer
from digest.commands import Command, parse_command, tidy
from digest.digests import compose_digest


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


@pytest.mark.parametrize("line,expected", [
    ("private E12", Command("private", (12,), raw="private E12")),
    ("Private e12", Command("private", (12,), raw="Private e12")),
    ("share E3, E4 E5", Command("share", (3, 4, 5), raw="share E3, E4 E5")),
    ("private thread E12", Command("private", (12,), True, raw="private thread E12")),
    ("share E12 thread", Command("share", (12,), True, raw="share E12 thread")),
    ("deal E12 4", Command("deal", (12,), target="4", raw="deal E12 4")),
    ("deal E12 Renewal 2027", Command("deal", (12,), target="Renewal 2027",
                                      raw="deal E12 Renewal 2027")),
    ("deal E12", Command("deal", (12,), raw="deal E12")),
    ("unlink E7", Command("unlink", (7,), raw="unlink E7")),
    ("person E7 ann@customer.test", Command("person", (7,), target="ann@customer.test",
                                            raw="person E7 ann@customer.test")),
    ("forget E7 E8", Command("forget", (7, 8), raw="forget E7 E8")),
    ("ignore @customer.test", Command("ignore", target="@customer.test",
                                      raw="ignore @customer.test")),
    ("track ann@customer.test", Command("track", target="ann@customer.test",
                                        raw="track ann@customer.test")),
    ("Re: forget E7", Command("forget", (7,), raw="forget E7")),
    # Japanese keywords, full-width letters, digits and spaces (NFKC).
    ("非公開 Ｅ１２", Command("private", (12,), raw="非公開 E12")),
    ("共有　スレッド　E12", Command("share", (12,), True, raw="共有 スレッド E12")),
    ("案件E12 Pilot", Command("deal", (12,), target="Pilot", raw="案件E12 Pilot")),
    ("紐付け解除 E12", Command("unlink", (12,), raw="紐付け解除 E12")),
    ("人物 E12 ann@customer.test", Command("person", (12,), target="ann@customer.test",
                                          raw="人物 E12 ann@customer.test")),
    ("削除 E12", Command("forget", (12,), raw="削除 E12")),
    ("無視 ＠customer.test", Command("ignore", target="@customer.test",
                                    raw="無視 @customer.test")),
    ("追跡 ann@customer.test", Command("track", target="ann@customer.test",
                                      raw="追跡 ann@customer.test")),
    # Not commands: questions, prose, quoted text, other words.
    ("deal 42", None),
    ("deal Renewal 2027", None),
    ("person Carl", None),
    ("shared E12", None),
    ("Share this with the team", None),
    ("> private E12", None),
    ("forget it", None),
    ("unlink thread E12", None),
    ("ignore ann and bob", None),
    ("Commands: private E2 | deal E2 <deal number or title> | forget E2", None),
])
def test_parse_command(line: str, expected: Command | None) -> None:
    assert parse_command(line) == expected


def test_a_mail_of_commands_questions_typos_and_prose() -> None:
    mail = parse_mail("private E1", "Hello,\ndeal E2 Pilot\nprivte E3\nAs discussed, E4 is "
                      "fine\n> forget E9\nforget E5\nignored\n-- \nAlice")
    assert [(c.verb, c.numbers, c.target) for c in mail.commands] == [
        ("private", (1,), ""), ("deal", (2,), "Pilot"), ("not_understood", (), ""),
        ("forget", (5,), "")]
    assert mail.commands[2].raw == "privte E3"
    assert mail.requests == [Request("ignored", raw="ignored")]
    # A question in the subject (the +ask way) with nothing else is what it always was.
    assert parse_mail("deal 3").requests == [Request("deal", "3", 3, "deal 3")]
    assert parse_mail("hello", "how are you").requests == [Request("unknown", raw="hello")]
    # Prose lines starting with a keyword are questions only on the first line.
    assert [r.kind for r in parse_mail("", "Thanks\nperson Carl called today").requests] == [
        "unknown"]


def test_tidy_keeps_each_command_once_and_drops_a_deal_named_elsewhere() -> None:
    # A mailto link puts "deal E2 " in the subject; the user typed the deal in the body.
    mail = parse_mail("deal E2 ", "deal E2 Pilot\nprivate E1\nprivate E1\nshare E1\n"
                      "private E1")
    assert [(c.verb, c.numbers, c.target) for c in tidy(mail.commands)] == [
        ("deal", (2,), "Pilot"), ("private", (1,), ""), ("share", (1,), ""),
        ("private", (1,), "")]


def test_mailto_is_rfc_6068() -> None:
    href = mailto("example+ask@dealmail.localhost", "案件 E12 ", "a+b & c")
    assert href == ("mailto:example+ask@dealmail.localhost?subject=%E6%A1%88%E4%BB%B6%20E12%20"
                    "&body=a%2Bb%20%26%20c")


def test_action_links_read_back_as_the_command_they_show(world: World) -> None:
    ann = world.person("ann@customer.test")
    mine = world.email("Offer", sightings=[("alice@example.com", "shared")], person=ann,
                       deal=world.deal("Renewal 2027"), date=after(1))
    world.email("Bob's", sightings=[("bob@example.com", "shared")], person=ann,
                deal=world.deal("Renewal 2027"), date=after(2))
    items = [e for d in compose_digest(world.config, "alice@example.com", T0, after(30),
                                       after(30)).context["by_deal"]
             for g in d["persons"] for e in g["emails"]]
    by_handle = {e["handle"]: e for e in items}
    assert set(by_handle) == {"E1", "E2"}
    assert by_handle["E2"]["actions"] == []  # a colleague's email: a handle, no commands
    actions = by_handle[f"E{mine.number}"]["actions"]
    assert [a["label"] for a in actions] == ["Private", "Move to deal…", "Unlink", "Forget"]
    for a in actions:
        parts = urlsplit(a["href"])
        assert (parts.scheme, parts.path) == ("mailto", "example+ask@dealmail.localhost")
        fields = dict(p.split("=", 1) for p in parts.query.split("&"))
        subject = unquote(fields["subject"])
        command = parse_command(subject)
        assert command is not None and command.numbers == (mine.number,)
        if a["key"] != "deal":
            assert subject == a["command"]
        else:  # the deal is for the user to type after the handle
            assert command.target == "" and "body" in fields


# --------------------------------------------------------------------------- answers


def answered(w: World, user: str, subject: str, body: str = "") -> tuple[str, str]:
    answer, _results = answer_mail(w.config, user, parse_mail(subject, body), after(30))
    subject_, text, html = render_answer(answer)
    return subject_ + "\n" + text, html


def test_answer_lists_done_unchanged_and_refused(world: World) -> None:
    ann = world.person("ann@customer.test")
    e = world.email("Offer", sightings=[("alice@example.com", "shared")], person=ann)
    h = f"E{e.number}"
    text, html = answered(world, "alice@example.com", f"private {h}",
                          f"private {h}\nshare {h}\nprivate {h}\nforget E77\ndeal {h} e\n"
                          f"deal {h} Renewl 2027")
    assert text.startswith("dealmail: your commands: 3 done, 3 refused\n")
    lines = [ln for ln in text.splitlines() if ln.startswith("  - ")]
    assert lines == [
        f"  - {h} “Offer”: your copy is now private (only you see it).",
        f"  - {h} “Offer”: your copy is now shared with your colleagues.",
        f"  - {h} “Offer”: your copy is now private (only you see it).",
        "  - E77: unknown, or not your email.",
        f"  - {h} “Offer”: several deals match “e”; write the deal's number. Candidates: "
        "#1 Renewal 2027, #2 Upsell seats, #4 Old order.",
        f"  - {h} “Offer”: no deal matches “Renewl 2027”. Candidates: #1 Renewal 2027."]
    assert '<li class="refused"><strong>refused</strong>: E77: unknown' in html


def test_refusals_tell_nothing_apart(world: World) -> None:
    """A colleague's private email, a colleague's shared one, a quarantined copy of one's own
    and a number never given: the same words, and no trace of the email."""
    ann = world.person("ann@customer.test")
    private = world.email("Secret", sightings=[("bob@example.com", "private")], person=ann)
    shared = world.email("Open", sightings=[("bob@example.com", "shared")], person=ann)
    forged = world.email("Forged", sightings=[("alice@example.com", "quarantined")])
    texts = []
    for number in (private.number, shared.number, forged.number, 999):
        text, html = answered(world, "alice@example.com", f"forget E{number}",
                              f"deal E{number} Pilot\nperson E{number} dora@customer.test")
        assert "Secret" not in text + html and "Forged" not in text + html
        texts.append(re.sub(rf"\bE{number}\b", "E#", text))
    assert len(set(texts)) == 1
    assert m.Sighting.select().count() == 3 and m.Link.select().where(
        m.Link.deal.is_null(False)).count() == 0


def test_japanese_answer(world: World) -> None:
    e = world.email("見積もり", sightings=[("bob@example.com", "private")],
                    frm=("Bob Seller", "bob@example.com"))
    text, _html = answered(world, "bob@example.com", f"共有 E{e.number}", "無視リスト")
    assert text.startswith("dealmail: 記録しない相手\n")  # the question names the answer
    assert f"E{e.number} 「見積もり」: あなたのコピーを同僚と共有しました。" in text
    assert "記録しない相手はありません。" in text
