"""Mail that used to be stored wrong in silence, end to end over SMTP (a real listener on a
loopback port, smtplib as the client, the demo CRM in a fresh SQLite file):

* a customer writing from a free-mail domain becomes a person (never an organization);
* raw UTF-8 headers (RFC 6532, an SMTPUTF8 session) are read as UTF-8, an internationalised
  address stays a participant and a person, and ``dealmail inspect`` lists lossy steps;
* mail stored before the CRM knew a correspondent is linked when the person is imported;
* a "which deal?" question already decided another way is not sent;
* ``+deal<ID>`` naming a deal of another customer is obeyed, and the user is told.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from support.mail import message
from support.smtpsink import SmtpSink
from test_smart_bcc_e2e import BCC, convs, deal_id, send

from crmstore import models as m
from dealmail import cli
from digest.digests import compose_digest, render_digest
from digest.questions import batch_rows

ROOT = Path(__file__).resolve().parents[3]


def test_freemail_correspondent_becomes_a_person_without_organization(server: Any) -> None:
    send(server.port, message(to="Taro Yamada <taro.yamada@yahoo.co.jp>", subject="見積もり"))
    person = m.Person.get(m.Person.name == "Taro Yamada")
    assert person.auto_created and person.organization_id is None
    assert not m.OrgDomain.select().where(m.OrgDomain.domain == "yahoo.co.jp").exists()
    [thread] = convs("alice@example.com", person="taro.yamada@yahoo.co.jp")["threads"]
    assert thread["subject"] == "見積もり"


def test_raw_utf8_headers_and_an_internationalised_address(server: Any, tmp_path: Path,
                                                           capsys: Any) -> None:
    raw = ("From: Alice <alice@example.com>\r\n"
           "To: Jürgen Müller <jürgen@müller.test>\r\n"
           "Subject: Angebot für Müller — 見積もり\r\n"
           "Message-ID: <utf8-1@example.com>\r\n"
           "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           "Grüße\r\n").encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo("client.test")
        s.sendmail("alice@example.com", [BCC], raw, mail_options=["SMTPUTF8"])
    email = m.Email.get(m.Email.message_id == "<utf8-1@example.com>")
    assert email.subject == "Angebot für Müller — 見積もり"
    participants = {p.address: p for p in email.participants}
    jurgen = participants["jürgen@xn--mller-kva.test"]
    assert jurgen.name == "Jürgen Müller" and jurgen.person_id is not None
    [sighting] = email.sightings
    assert not any("internal only" in d for d in json.loads(sighting.decisions_json))

    # The same bytes with a Latin-1 Subject: read as Windows-1252, and said so.
    eml = tmp_path / "latin1.eml"
    eml.write_bytes(raw.replace("Angebot für Müller — 見積もり".encode(), b"caf\xe9"))
    assert cli.main(["inspect", str(eml), "--json", "--config",
                     str(server.app.config.path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subject"] == "café"
    assert any("not UTF-8" in d for d in report["defects"]), report["defects"]


def _sink_server(server_factory: Any, sink: SmtpSink) -> Any:
    return server_factory(f"outbox.smarthost=127.0.0.1:{sink.port}",
                          "outbox.smarthost_tls=opportunistic", start_outbox_worker=False)


def _follow_up_on_deal(port: int, first: Any, deal: int) -> None:
    reply = message(subject=f"Re: {first['Subject']}", In_Reply_To=first["Message-ID"],
                    References=first["Message-ID"])
    send(port, reply, [f"example+deal{deal}@dealmail.localhost"])


def test_question_decided_meanwhile_is_not_sent(server_factory: Any, clock: Any) -> None:
    with SmtpSink() as sink:
        srv = _sink_server(server_factory, sink)
        first = message(subject="Proposal")
        send(srv.port, first)  # Ann has two open deals: a question waits for its batch
        [question] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
        _follow_up_on_deal(srv.port, first, deal_id("Renewal 2027"))
        clock.advance(timedelta(minutes=5))
        srv.call(srv.app.outbox.run_once())
        assert sink.messages == []
    assert m.OutboxItem.get_by_id(question.id).state == "dropped"
    [thread] = convs("alice@example.com", person="ann@customer.test")["threads"]
    assert thread["deal"]["title"] == "Renewal 2027" and not thread["needs_choice"]


def test_batched_question_keeps_only_what_is_still_open(server_factory: Any,
                                                         clock: Any) -> None:
    with SmtpSink() as sink:
        srv = _sink_server(server_factory, sink)
        first, second = message(subject="Proposal"), message(subject="Seats for 2027")
        send(srv.port, first)
        clock.advance(timedelta(minutes=1))
        send(srv.port, second)  # joins the batch: one question email about two emails
        [item] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
        assert "2 emails" in item.subject
        _follow_up_on_deal(srv.port, first, deal_id("Upsell seats"))
        clock.advance(timedelta(minutes=5))
        srv.call(srv.app.outbox.run_once())
        [got] = sink.messages
    text = got.data.decode("utf-8", "replace")
    assert "Which deal? Seats for 2027" in text and "Subject: Which deals?" not in text
    token = re.search(r"Reply-To: example\+choice-([A-Za-z0-9_-]+)@", text)
    assert token is not None
    # The token in the sent email is the one the remaining question answers to.
    [(number, row)] = batch_rows(token.group(1))
    assert number == 1 and m.Email.get_by_id(row.email_id).subject == "Seats for 2027"


def test_plus_deal_of_another_customer_is_obeyed_and_said(server: Any) -> None:
    pilot = deal_id("Pilot")  # Carl's deal
    send(server.port, message(subject="Renewal terms"),
         [f"example+deal{pilot}@dealmail.localhost"])
    [thread] = convs("alice@example.com", person="ann@customer.test")["threads"]
    assert thread["deal"]["title"] == "Pilot"
    [email] = thread["emails"]
    assert any("belongs to Carl Other, not to Ann Customer" in d for d in email["decisions"])
    [notice] = m.OutboxItem.select().where(m.OutboxItem.kind == "notice")
    assert json.loads(notice.recipients_json) == ["alice@example.com"]
    parsed = BytesParser(policy=policy.default).parsebytes(bytes(notice.message))
    assert parsed["Auto-Submitted"] == "auto-generated"
    text = " ".join(parsed.get_content().split())
    assert "on deal #" in text and "belongs to Carl Other, not to Ann Customer" in text
    # Her own deal named: no notice.
    send(server.port, message(subject="Renewal terms 2"),
         [f"example+deal{deal_id('Renewal 2027')}@dealmail.localhost"])
    assert m.OutboxItem.select().where(m.OutboxItem.kind == "notice").count() == 1


def _cli(server: Any, *args: str) -> str:
    """The dealmail CLI in its own process, on the running server's database (models are
    bound per process, so the CLI cannot run inside the test process next to the server)."""
    config = server.app.config
    done = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", *args, "--config", str(config.path),
         "--set", f"database.url={config.database.url}"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_links_earlier_mail(server_factory: Any, tmp_path: Path) -> None:
    srv = server_factory("policy.create_unknown_persons=false")
    send(srv.port, message(to="Eve Newco <eve@newco.test>", subject="Intro"))
    [participant] = m.Participant.select().where(m.Participant.address == "eve@newco.test")
    assert participant.person_id is None
    csv = tmp_path / "persons.csv"
    csv.write_text("Name,Email\nEve Newco,eve@newco.test\n", encoding="utf-8")
    out = _cli(srv, "import", "persons", str(csv), "--company", "example")
    # Linked by the import itself, in its transaction.
    assert "earlier mail: 1 email(s) linked to the imported persons" in out
    [thread] = convs("alice@example.com", person="eve@newco.test")["threads"]
    assert thread["subject"] == "Intro"
    audit = m.AuditEntry.get(m.AuditEntry.action == "relink")
    assert json.loads(audit.detail_json)["persons"] == [
        m.PersonAddress.get(m.PersonAddress.address == "eve@newco.test").person_id]
    assert "0 email(s) linked" in _cli(srv, "relink", "--company", "example")  # idempotent


def test_person_created_later_links_the_earlier_mail(server_factory: Any) -> None:
    srv = server_factory("policy.create_unknown_persons=false")
    send(srv.port, message(to="Eve Newco <eve@newco.test>", subject="Intro"))
    srv.app.config = replace(srv.app.config, policy=replace(
        srv.app.config.policy, create_unknown_persons=True))
    send(srv.port, message(to="Eve Newco <eve@newco.test>", subject="Follow-up"))
    threads = convs("alice@example.com", person="eve@newco.test")["threads"]
    assert sorted(t["subject"] for t in threads) == ["Follow-up", "Intro"]
    assert m.AuditEntry.select().where(m.AuditEntry.action == "relink").count() == 1


def test_relink_to_a_person_with_several_deals_asks_which(server_factory: Any,
                                                          tmp_path: Path) -> None:
    srv = server_factory("policy.create_unknown_persons=false", start_outbox_worker=False)
    send(srv.port, message(to="Ann <ann.private@other-mail.test>", subject="From home"))
    csv = tmp_path / "persons.csv"
    csv.write_text("Name,Email\nAnn Customer,\"ann@customer.test; ann.private@other-mail.test\"\n",
                   encoding="utf-8")
    assert "1 question(s) queued" in _cli(srv, "import", "persons", str(csv),
                                          "--company", "example")
    [question] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
    assert question.subject == "Which deal? From home"
    [thread] = convs("alice@example.com", person="ann@customer.test")["threads"]
    assert thread["needs_choice"] and thread["deal"] is None


def _outlook_forward(sender_line: str, subject: str) -> Any:
    body = ("FYI, see below.\n\n"
            "________________________________\n"
            f"From: {sender_line}\n"
            "Sent: Thursday, November 26, 2026 9:14 AM\n"
            "To: Alice Admin\n"
            f"Subject: {subject}\n\n"
            "Can we start the pilot in January?\n\nBest,\nCarl\n")
    fwd = message(subject=f"FW: {subject}", body=body)
    del fwd["To"]  # a forward to the Smart BCC address: To left empty, the address in Bcc
    return fwd


def test_name_only_outlook_forward_is_matched_by_name(server: Any) -> None:
    send(server.port, _outlook_forward("Carl Other", "Pilot timing"))
    [thread] = convs("alice@example.com", person="carl@other.test")["threads"]
    assert thread["subject"] == "Pilot timing" and thread["deal"]["title"] == "Pilot"
    [email] = thread["emails"]
    assert email["channel"] == "forward"
    assert any("matched by name" in d for d in email["decisions"])


def test_name_only_forward_of_a_stranger_is_said_in_the_digest(server: Any) -> None:
    send(server.port, _outlook_forward("Zed Nobody", "Quick question"))
    email = m.Email.get(m.Email.subject == "Quick question")
    assert json.loads(email.forward_json)["unattributed"] == "Zed Nobody"
    now = server.app.clock.now()
    digest = compose_digest(server.app.config, "alice@example.com",
                            now - timedelta(days=1), now + timedelta(minutes=1), now)
    _subject, text, _html = render_digest(digest)
    handle = f"E{email.number}"
    assert ("could not tell who wrote the forwarded email (shown only as “Zed Nobody”): "
            f"reply “person {handle} their@address”") in " ".join(text.split())
    assert "internal only" not in text


def test_relink_command_links_what_an_older_version_left(server_factory: Any) -> None:
    """Mail stored before this version linked free-mail correspondents: ``dealmail relink``
    links it to the persons the CRM has now."""
    srv = server_factory("policy.create_unknown_persons=false")
    send(srv.port, message(to="Taro <taro@yahoo.co.jp>", subject="見積もり"))
    with srv.app.store.transaction():
        person = m.Person.create(company=m.Company.get().id, name="Taro Yamada")
        m.PersonAddress.create(person=person.id, company=person.company_id,
                               address="taro@yahoo.co.jp")
    assert "example: 1 email(s) linked" in _cli(srv, "relink", "--company", "example")
    [thread] = convs("alice@example.com", person="taro@yahoo.co.jp")["threads"]
    assert thread["subject"] == "見積もり"
    assert "example: 0 email(s) linked" in _cli(srv, "relink")
