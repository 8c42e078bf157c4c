"""parse_forward_date on dates as mail clients print them in many languages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from linking.fwddates import parse_forward_date
from linking.htmltext import html_to_text

CET = timezone(timedelta(hours=1))


def _tz(hours: float) -> timezone:
    return timezone(timedelta(hours=hours))


CASES = [
    # (text, expected) - expected naive values are in the default zone (CET here)
    ("Thu, 26 Nov 2026 10:03:00 +0100", datetime(2026, 11, 26, 10, 3, tzinfo=_tz(1))),
    ("Tue, 3 May 2016 14:54:27 +0200 (CEST)", datetime(2016, 5, 3, 14, 54, 27, tzinfo=_tz(2))),
    ("2026年11月26日(木) 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("2026年11月26日 午後3:05", datetime(2026, 11, 26, 15, 5, tzinfo=CET)),
    ("2022年9月19日月曜日 17:55:44 -0400", datetime(2022, 9, 19, 17, 55, 44, tzinfo=_tz(-4))),
    ("2026/11/26 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("jeu. 26 nov. 2026 à 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("mar. 24 nov. 2026 à 22:03", datetime(2026, 11, 24, 22, 3, tzinfo=CET)),
    ("Donnerstag, 26. November 2026 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("Mi., 27. Okt. 2021 um 09:31 Uhr", datetime(2021, 10, 27, 9, 31, tzinfo=CET)),
    ("26 de noviembre de 2026, 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("mié, 27 oct 2021 a las 9:31", datetime(2021, 10, 27, 9, 31, tzinfo=CET)),
    ("qua., 27 de out. de 2021 às 09:31", datetime(2021, 10, 27, 9, 31, tzinfo=CET)),
    ("On Thu, Nov 26, 2026 at 10:03 AM", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("Wednesday, July 09, 2014 10:27 PM", datetime(2014, 7, 9, 22, 27, tzinfo=CET)),
    ("November 26, 2026 at 10:03:00 AM GMT+1", datetime(2026, 11, 26, 10, 3, tzinfo=_tz(1))),
    ("1. August 2011 23:28:15 GMT-07:00", datetime(2011, 8, 1, 23, 28, 15, tzinfo=_tz(-7))),
    ("26.11.2026 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("28/10/2021 12:46", datetime(2021, 10, 28, 12, 46, tzinfo=CET)),
    ("10/28/2021 3:05 PM", datetime(2021, 10, 28, 15, 5, tzinfo=CET)),
    ("czwartek, 28 października 2021 o 12:46", datetime(2021, 10, 28, 12, 46, tzinfo=CET)),
    ("poniedziałek, 19 września 2022, 17:55:44 -0400",
     datetime(2022, 9, 19, 17, 55, 44, tzinfo=_tz(-4))),
    ("четверг, 28 октября 2021 г. в 12:46", datetime(2021, 10, 28, 12, 46, tzinfo=CET)),
    ("Среда, 14 июня 2017, 15:19 +03:00", datetime(2017, 6, 14, 15, 19, tzinfo=_tz(3))),
    ("вторник, 2 ноября 2021 г., 09:26:50 GMT+1",
     datetime(2021, 11, 2, 9, 26, 50, tzinfo=_tz(1))),
    ("26. října 2021 14:25:08 GMT+3", datetime(2021, 10, 26, 14, 25, 8, tzinfo=_tz(3))),
    ("3. července 2021 8:00", datetime(2021, 7, 3, 8, 0, tzinfo=CET)),
    ("3. června 2021 8:00", datetime(2021, 6, 3, 8, 0, tzinfo=CET)),
    ("štvrtok, 28. októbra 2021, 12:46", datetime(2021, 10, 28, 12, 46, tzinfo=CET)),
    ("torstaina, 28. lokakuuta 2021 klo 12.06", datetime(2021, 10, 28, 12, 6, tzinfo=CET)),
    ("26. oktober 2021 kl. 14.25.08 EEST", datetime(2021, 10, 26, 14, 25, 8, tzinfo=_tz(3))),
    ("ons. 27. okt. 2021 kl. 09.31", datetime(2021, 10, 27, 9, 31, tzinfo=CET)),
    ("2021. okt. 27., Sze, 9:31", datetime(2021, 10, 27, 9, 31, tzinfo=CET)),
    ("26 Ekim 2021 14:25:08 GMT+3", datetime(2021, 10, 26, 14, 25, 8, tzinfo=_tz(3))),
    ("maandag 19 september 2022 17:55:44 -0400",
     datetime(2022, 9, 19, 17, 55, 44, tzinfo=_tz(-4))),
    ("14 novembre 2015 15:14:53 UTC+1", datetime(2015, 11, 14, 15, 14, 53, tzinfo=_tz(1))),
    ("giovedì 26 novembre 2026 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("26 listopada 2026 10:03", datetime(2026, 11, 26, 10, 3, tzinfo=CET)),
    ("26 martie 2026 10:03", datetime(2026, 3, 26, 10, 3, tzinfo=CET)),
    ("26 Mar 2026 10:03 PST", datetime(2026, 3, 26, 10, 3, tzinfo=_tz(-8))),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_formats(text: str, expected: datetime) -> None:
    got = parse_forward_date(text, CET)
    assert got == expected
    assert got is not None and got.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["", "   ", "someday", "Re: offer 12", "42", "99.99.9999 10:00"])
def test_unreadable(text: str) -> None:
    assert parse_forward_date(text, UTC) is None


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 25


def test_html_to_text_keeps_lines() -> None:
    html = (
        "<html><head><title>t</title><style>p{x:1}</style></head><body>"
        "<div>Hello&nbsp;<b>you</b> &amp; me</div><p>para  one\n two</p>"
        "<table><tr><th>From:</th><td>A &lt;a@x.example&gt;</td></tr>"
        "<tr><td>To:</td><td>b@x.example</td></tr></table>"
        "<blockquote>quoted<br>line</blockquote><script>var x = '<p>';</script>tail  </body></html>"
    )
    assert html_to_text(html) == (
        "Hello you & me\n\npara one two\n\nFrom: A <a@x.example>\nTo: b@x.example\n"
        "quoted\nline\ntail"
    )
