"""The HTML digest opened in a real browser: headless Chromium (Debian package ``chromium``)
renders it without errors, takes a screenshot, and the page's text (``--dump-dom``) contains
the deal titles. Injected markup in a subject stays text: the DOM has no script element. The
one-click actions beside the user's own emails are in the DOM as the browser parsed them:
``mailto:`` links to the ask address whose subject is the command they show.

Chromium runs with networking features off and a throw-away profile; the page is a local file.
Missing Chromium skips with a message, except in CI where it must be installed
(``scripts/test`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from digest_world import World, make_world
from test_digests import SINCE, UNTIL, scenario

from digest.commands import parse_command
from digest.digests import compose_digest, render_digest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI (apt-get install chromium)")
    pytest.skip("chromium is not installed: apt-get install -y chromium (as root)")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.links: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "a":
            self.links.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def run(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, timeout=120, check=False,
        env={**os.environ, "HOME": str(tmp_path)})


def test_html_digest_renders_in_headless_chromium(world: World, tmp_path: Path) -> None:
    browser = chromium()
    scenario(world)
    digest = compose_digest(world.config, "bob@example.com", SINCE, UNTIL, UNTIL)
    _subject, _text, html = render_digest(digest)
    page = tmp_path / "digest.html"
    page.write_text(html, encoding="utf-8")
    shot = tmp_path / "digest.png"
    result = run(browser, tmp_path, f"--screenshot={shot}", "--window-size=1000,1400",
                 page.as_uri())
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000  # a real, drawn page
    dom = run(browser, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    parser = _Text()
    parser.feed(dom.stdout.decode("utf-8"))
    text = " ".join(" ".join(parser.text).split())
    for title in ("Pilot", "Renewal 2027"):
        assert f"#{world.deal(title).id} {title}" in text
    assert "見積もりのご案内" in text
    assert "script" not in parser.tags
    actions = [a for a in parser.links if a.get("class") == "action"]
    commands = {}
    for a in actions:
        href = str(a["href"])
        address, _, query = href.removeprefix("mailto:").partition("?")
        assert href.startswith("mailto:") and address == "example+ask@dealmail.localhost"
        fields = dict(pair.split("=", 1) for pair in query.split("&"))
        assert " " not in query and set(fields) <= {"subject", "body"}
        subject = unquote(fields["subject"])
        command = parse_command(subject)
        assert command is not None, subject
        commands[str(a["data-command"])] = command
    # Bob's two own emails (a shared one and a private one); Alice's on his deal: none.
    e3, e4 = (f"E{world.email_number(s)}" for s in ("見積もりのご案内", "Bob private terms"))
    assert set(commands) == {f"非公開 {e3}", f"案件 {e3} <案件番号または案件名>",
                             f"紐付け解除 {e3}", f"削除 {e3}", f"共有 {e4}",
                             f"案件 {e4} <案件番号または案件名>", f"紐付け解除 {e4}",
                             f"削除 {e4}"}
    assert commands[f"共有 {e4}"].verb == "share"
