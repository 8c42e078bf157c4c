"""dealmail behind a real Postfix (docs/reliability.md C.6): Postfix -> LMTP -> dealmail.

One private Postfix per module (bench/postfixrun.py: ``postfix -c DIR``, loopback only, its
own queue and log), configured with exactly what ``dealmail postfix-config --write DIR
--postmap`` generated, plus a transport that sends the customers' and users' domains to a
local SMTP sink. Each test starts its own dealmail (fresh database) on the same LMTP port.
Without Postfix these tests fail (PostfixMissing), they never skip.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.postfixrun import PrivatePostfix, free_port
from crmstore import models as m
from mta.routing import mailbox_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from senderauth_support import rsa_key, sign
from smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
DOMAIN = "dealmail.localhost"
SENT = f"example+sent@{DOMAIN}"
BOB_IN = f"example+received-{mailbox_key('example', 'bob@example.com')}@{DOMAIN}"
ALICE_IN = f"example+received-{mailbox_key('example', 'alice@example.com')}@{DOMAIN}"


@dataclass
class Plugin:
    postfix: PrivatePostfix
    sink: SmtpSink
    lmtp_port: int

    @property
    def lmtp(self) -> str:
        return f"listeners.lmtp=127.0.0.1:{self.lmtp_port}"

    def submit(self, mail_from: str, rcpts: list[str], raw: bytes) -> int:
        """Hand a message to Postfix's smtpd (as a user's mail client on the office network
        would); returns the log offset before it, to look for its delivery lines."""
        since = self.postfix.log_size()
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=30) as client:
            client.sendmail(mail_from, rcpts, raw)
        return since

    def wait(self, pattern: str, since: int, count: int = 1, timeout: float = 30) -> list[str]:
        return self.postfix.wait_log(pattern, count=count, since=since, timeout=timeout,
                                     flush=self.postfix.flush)


def to(address: str) -> str:
    """The ``to=<...>`` of Postfix's delivery log lines for ``address``."""
    return f"to=<{re.escape(address)}>"


def mail(mid: str, to: str = "Carl <carl@other.test>", frm: str = "Alice <alice@example.com>",
         subject: str = "Pilot plan") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{mid}>\r\n"
            "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n\r\nHello,\r\nhere is the plan.\r\n"
            ).encode()


def _settings(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in
            text.splitlines() if line.strip() and not line.startswith("#"))}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    root = tmp_path_factory.mktemp("postfix")
    lmtp_port = free_port()
    sink = SmtpSink().start()
    postfix = PrivatePostfix(root / "pf")
    postfix.write()  # a main.cf for postmap -c
    maps = root / "maps"
    # The admin's step: generate and write the maps (postmap included) with the real CLI.
    proc = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", "--config", str(EXAMPLE), "--set",
         f"listeners.lmtp=127.0.0.1:{lmtp_port}", "--set",
         'lmtp.xforward_hosts=["127.0.0.1/32"]', "postfix-config", "--write", str(maps),
         "--postmap", "--postfix-dir", str(postfix.conf)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    main = _settings((maps / "dealmail_main.cf").read_text())
    # Test harness only: the customers' and users' own domains go to the sink, and a
    # connection to dealmail is not cached (each test starts a new dealmail on the port).
    sink_map = "".join(f"{d} smtp:[127.0.0.1]:{sink.port}\n"
                       for d in ("other.test", "customer.test", "example.com"))
    main["transport_maps"] += f", hash:{postfix.conf / 'sink_transport'}"
    main["lmtp_connection_cache_on_demand"] = "no"
    postfix.main.update(main)
    postfix.master = (maps / "dealmail_master.cf").read_text()
    postfix.maps["sink_transport"] = sink_map
    postfix.start()
    try:
        yield Plugin(postfix, sink, lmtp_port)
    finally:
        postfix.stop()
        sink.stop()


def emails(mid: str) -> list[Any]:
    return list(m.Email.select().where(m.Email.message_id == f"<{mid}>"))


def test_generated_config_refuses_unknown_and_mta_only_addresses_at_postfix(
        plugin: Plugin) -> None:
    with smtplib.SMTP("127.0.0.1", plugin.postfix.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("someone@elsewhere.test")
        for address in (SENT, BOB_IN, f"nobody@{DOMAIN}", f"example+bogus@{DOMAIN}"):
            code, text = client.rcpt(address)
            assert code == 550 and b"5.1.1" in text, (address, code, text)
        for address in (f"example@{DOMAIN}", f"example+deal12@{DOMAIN}",
                        f"example+ask@{DOMAIN}"):
            assert client.rcpt(address)[0] == 250, address
        client.rset()


def test_three_recipients_one_unknown_stored_once(plugin: Plugin, server_factory: Any) -> None:
    server_factory(plugin.lmtp)
    pilot = m.Deal.get(m.Deal.title == "Pilot").id
    good, unknown = f"example+deal{pilot}@{DOMAIN}", f"example+deal999999@{DOMAIN}"
    since = plugin.submit("alice@example.com", [good, unknown, "carl@other.test"],
                          mail("three@example.com"))
    plugin.wait(rf"{to(unknown)}.*status=bounced .*550 5\.1\.1", since)
    plugin.wait(rf"to=<example\+(deal{pilot}|sent)@dealmail\.localhost>.*status=sent", since, 2)
    plugin.wait(r"to=<carl@other\.test>.*status=sent", since)
    assert [e.id for e in emails("three@example.com")] and len(emails("three@example.com")) == 1
    email = emails("three@example.com")[0]
    assert m.Link.select().where((m.Link.email == email.id) & (m.Link.deal == pilot)).exists()
    assert m.Sighting.select().where(m.Sighting.email == email.id).count() == 1
    sighting = m.Sighting.get(m.Sighting.email == email.id)
    evidence = json.loads(sighting.evidence_json)
    assert sighting.client_ip == "127.0.0.1" and evidence["xforward"]["IDENT"]
    # Postfix's bounce for the unknown address went to alice (Postfix applies no BCC maps to
    # the mail it generates itself).
    plugin.wait(r"to=<alice@example\.com>.*status=sent", since)
    assert m.Email.select().count() == 1


def test_sender_bcc_copy_reaches_customer_and_is_captured_and_own_digest_is_not(
        plugin: Plugin, server_factory: Any, clock: Any) -> None:
    running = server_factory(plugin.lmtp, f"outbox.smarthost=127.0.0.1:{plugin.postfix.port}",
                             "outbox.smarthost_tls=opportunistic", start_outbox_worker=False)
    since = plugin.submit("alice@example.com", ["ann@customer.test"],
                          mail("sbcc@example.com", to="Ann <ann@customer.test>"))
    plugin.wait(rf"{to(SENT)}.*status=sent", since)
    plugin.wait(r"to=<ann@customer\.test>.*status=sent", since)
    assert any(b"sbcc@example.com" in msg.data for msg in plugin.sink.messages)
    (email,) = emails("sbcc@example.com")
    sighting = m.Sighting.get(m.Sighting.email == email.id)
    assert (sighting.user.address, sighting.channel) == ("alice@example.com", "mta")
    assert sighting.verification == "trusted-network"
    # Ann has two open deals: the usual question is pending, as for any captured mail.
    assert m.PendingChoice.select().count() == 1

    # dealmail's own digest to alice, sent through the same Postfix: recipient_bcc_maps
    # hands a copy back to dealmail, which accepts it and captures nothing.
    from digest.digests import compose_digest, queue_digest

    app = running.app
    clock.advance(timedelta(minutes=1))
    now = clock.now()
    with app.store.transaction():
        digest = compose_digest(app.config, "alice@example.com", now - timedelta(days=1),
                                now, now)
        assert queue_digest(app.config, digest, "test", now)
    since = plugin.postfix.log_size()
    before = (m.Email.select().count(), m.Sighting.select().count(),
              m.PendingChoice.select().count())
    assert running.call(app.outbox.run_once()) >= 1
    plugin.wait(rf"{to(ALICE_IN)}.*status=sent .*ignored", since)
    plugin.wait(r"to=<alice@example\.com>.*status=sent", since)
    assert (m.Email.select().count(), m.Sighting.select().count(),
            m.PendingChoice.select().count()) == before


def test_one_recipient_deferred_is_retried_alone_without_duplicate(
        plugin: Plugin, server_factory: Any, dns: Any, clock: Any) -> None:
    clock.set(datetime.now(UTC))  # the signature's t= must not lie in dealmail's future
    # Only DKIM can prove alice's mail here; its key lookup fails for now (451 4.7.5).
    server_factory(plugin.lmtp, "policy.trusted_networks=[]")
    key = rsa_key(1024)
    dns.txt["sel._domainkey.example.com"] = [key.txt]
    dns.fail.add("sel._domainkey.example.com")
    raw = sign(mail("retry@example.com", to="Bob <bob@example.com>, Carl <carl@other.test>"),
               "example.com", key)
    since = plugin.submit("alice@example.com", ["bob@example.com", "carl@other.test"], raw)
    plugin.wait(rf"{to(SENT)}.*status=deferred .*451 4\.7\.5", since)
    plugin.wait(rf"{to(BOB_IN)}.*status=sent", since)
    (email,) = emails("retry@example.com")
    assert [s.user.address for s in m.Sighting.select()] == ["bob@example.com"]
    dns.fail.clear()
    plugin.wait(rf"{to(SENT)}.*status=sent", since)
    # Postfix retried alice's copy alone: bob's copy was delivered once.
    assert len(plugin.wait(rf"{to(BOB_IN)}", since)) == 1
    assert emails("retry@example.com") == [email]
    sightings = {(s.user.address, s.verification) for s in m.Sighting.select()}
    assert sightings == {("bob@example.com", "mailbox"), ("alice@example.com", "strong")}


def test_internal_fault_defers_every_recipient_then_delivers(
        plugin: Plugin, server_factory: Any) -> None:
    running = server_factory(plugin.lmtp)
    committer = running.app.committer

    def broken() -> None:
        raise RuntimeError("database unavailable (injected)")

    committer.before_commit = broken
    since = plugin.submit("alice@example.com", [f"example@{DOMAIN}", "carl@other.test"],
                          mail("fault@example.com"))
    plugin.wait(r"to=<example(\+sent)?@dealmail\.localhost>.*status=deferred .*451 4\.3\.0",
                since, 2)
    assert "status=bounced" not in plugin.postfix.log()[since:]
    assert not emails("fault@example.com")
    committer.before_commit = None
    plugin.wait(r"to=<example(\+sent)?@dealmail\.localhost>.*status=sent", since, 2)
    assert len(emails("fault@example.com")) == 1


def test_dealmail_down_postfix_defers_and_delivers_after_start(
        plugin: Plugin, server_factory: Any) -> None:
    since = plugin.submit("alice@example.com", ["carl@other.test"], mail("down@example.com"))
    plugin.wait(rf"{to(SENT)}.*status=deferred", since)
    server_factory(plugin.lmtp)
    plugin.wait(rf"{to(SENT)}.*status=sent", since)
    assert len(emails("down@example.com")) == 1


def test_over_the_connection_cap_postfix_defers_not_bounces(
        plugin: Plugin, server_factory: Any) -> None:
    server_factory(plugin.lmtp, "lmtp.max_connections=1")
    holder = socket.create_connection(("127.0.0.1", plugin.lmtp_port), timeout=10)
    assert holder.makefile("rb").readline().startswith(b"220")
    since = plugin.submit("alice@example.com", ["carl@other.test"], mail("cap@example.com"))
    plugin.wait(rf"{to(SENT)}.*status=deferred .*421 4\.3\.2", since)
    holder.close()
    plugin.wait(rf"{to(SENT)}.*status=sent", since)
    assert "status=bounced" not in plugin.postfix.log()[since:]
    assert len(emails("cap@example.com")) == 1


def test_xforward_not_offered_to_an_untrusted_postfix(plugin: Plugin,
                                                      server_factory: Any) -> None:
    server_factory(plugin.lmtp, 'lmtp.xforward_hosts=["192.0.2.0/24"]')
    since = plugin.submit("alice@example.com", ["carl@other.test"], mail("noxf@example.com"))
    plugin.wait(rf"{to(SENT)}.*status=sent", since)
    sighting = m.Sighting.get()
    # Postfix sends XFORWARD only when it is advertised: the client is Postfix itself.
    assert "xforward" not in json.loads(sighting.evidence_json)
    assert sighting.client_ip == "127.0.0.1"
