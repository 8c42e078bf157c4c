"""The Prometheus endpoint (``listeners.metrics``), scraped with a real HTTP client: messages
by outcome, the ingest latency histogram, the outbox and quarantine gauges."""

from __future__ import annotations

import smtplib
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

BCC = "example@dealmail.localhost"


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def mail(sender: str, subject: str) -> bytes:
    return (f"From: {sender}\r\nTo: Carl <carl@other.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.com>\r\n\r\nhello\r\n").encode()


def test_metrics_endpoint_counts_what_the_listener_answered(server_factory: Any) -> None:
    running = server_factory("listeners.metrics=127.0.0.1:0")
    address = running.app.metrics_server.server_address
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as s:
        s.sendmail("alice@example.com", [BCC], mail("Alice <alice@example.com>", "m1"))
        s.sendmail("alice@example.com", [BCC], mail("Alice <alice@example.com>", "m2"))
        try:
            s.sendmail("eve@evil.test", [BCC], mail("Eve <eve@evil.test>", "m3"))
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550
    values = scrape(address)
    inbound = ("listener", "inbound")
    assert values[("dealmail_messages_total", (inbound, ("outcome", "stored")))] == 2
    assert values[("dealmail_messages_total", (inbound, ("outcome", "refused_sender")))] == 1
    assert values[("dealmail_ingest_seconds_count", (inbound,))] == 3
    assert values[("dealmail_ingest_seconds_bucket", (("le", "+Inf"), inbound))] == 3
    assert values[("dealmail_outbox_items", (("state", "queued"),))] >= 0
    assert values[("dealmail_quarantined_copies", ())] == 0
    assert ("dealmail_outbox_oldest_deferred_seconds", ()) in values
