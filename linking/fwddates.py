"""Tolerant parsing of the dates that mail clients write into forwarded-message headers.

A forward's header block carries the original's date as the *forwarder's client* printed
it, localized: ``Thu, 26 Nov 2026 10:03:00 +0100`` (RFC 5322 §3.3), but also
``2026年11月26日(木) 10:03``, ``jeu. 26 nov. 2026 à 10:03``, ``czwartek, 28 października
2021 o 12:46`` and so on. :func:`parse_forward_date` finds a year, a month (number or a
month name in about 25 languages), a day, a time and an optional zone in such text.
When no zone is written the caller's ``default_tz`` applies. It never raises; ``None``
means "could not read a date" and the caller falls back to the forward's own Date.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta, timezone, tzinfo
from email.utils import parsedate_to_datetime

__all__ = ["parse_forward_date"]

# Month stems, accent-stripped and case-folded (see _fold). A token is a month when it
# starts with one of these stems; the longest matching stem wins, which is how the
# Czech červenec (July) beats červen (June) and Polish lipiec (July) beats Croatian
# lipanj (June).
_MONTH_STEMS: dict[int, tuple[str, ...]] = {
    1: ("jan", "ene", "gen", "tammi", "stycz", "leden", "ledna", "sijec", "ian", "январ",
        "янв", "січ", "ocak", "jaan"),
    2: ("feb", "fev", "helmi", "lut", "unor", "unora", "velj", "феврал", "фев", "лют",
        "subat", "veebr"),
    3: ("mar", "maalis", "brez", "ozuj", "март", "мар", "берез", "maart", "mär"),
    4: ("apr", "avr", "abr", "huhti", "kwie", "dub", "trav", "апрел", "апр", "квіт",
        "nisan"),
    5: ("may", "mai", "mag", "mei", "maj", "touko", "kvet", "svib", "май", "мая", "трав"),
    6: ("jun", "juin", "giu", "kesa", "czerw", "cerven", "cervna", "lipanj", "lipnja",
        "iun", "июн", "черв", "haziran", "juuni"),
    7: ("jul", "juil", "lug", "heina", "lipiec", "lipca", "cervenec", "cervence", "srpanj",
        "srpnja", "iul", "июл", "лип", "temmuz", "juuli"),
    8: ("aug", "aout", "ago", "elok", "sierp", "srpen", "srpna", "kolovoz", "август", "авг",
        "серп", "agustos", "ağustos"),
    9: ("sep", "set", "syys", "wrzes", "zari", "ruj", "сентябр", "сен", "верес", "eylul",
        "szept"),
    10: ("oct", "okt", "ott", "out", "loka", "pazdz", "rijen", "rijna", "октябр", "окт",
         "жовт", "ekim", "lokakuu"),
    11: ("nov", "marras", "listopad", "noiem", "ноябр", "ноя", "листоп", "kasim", "kasım",
         "studen"),
    12: ("dec", "dic", "dez", "joulu", "grud", "prosin", "декабр", "дек", "груд", "aralik",
         "aralık", "detsem"),
}

_STEMS: tuple[tuple[str, int], ...] = tuple(
    sorted(
        ((stem, month) for month, stems in _MONTH_STEMS.items() for stem in stems),
        key=lambda item: -len(item[0]),
    )
)

# Named zones that clients print after the time (Apple Mail: "EEST", Thunderbird: "(CEST)").
_ZONE_NAMES: dict[str, int] = {
    "UTC": 0, "GMT": 0, "UT": 0, "Z": 0, "WET": 0, "WEST": 60, "BST": 60, "CET": 60,
    "CEST": 120, "MEZ": 60, "MESZ": 120, "EET": 120, "EEST": 180, "MSK": 180, "EST": -300,
    "EDT": -240, "CST": -360, "CDT": -300, "MST": -420, "MDT": -360, "PST": -480,
    "PDT": -420, "AKST": -540, "AKDT": -480, "HST": -600, "JST": 540, "KST": 540,
    "HKT": 480, "SGT": 480, "AEST": 600, "AEDT": 660, "NZST": 720, "NZDT": 780,
    "IST": 330,
}

_RFC5322_RE = re.compile(
    r"^\s*(?:[A-Za-z]{3},\s*)?\d{1,2}\s+[A-Za-z]{3}\s+\d{2,4}\s+\d{1,2}:\d{2}(?::\d{2})?"
    r"\s*(?:[+-]\d{4}|[A-Z]{1,5})(?:\s*\(.*\))?\s*$"
)
# Year-month-day with digits: 2026-11-26, 2026/11/26, 2026年11月26日, 2021. 10. 27.
_YMD_RE = re.compile(
    r"(?<!\d)(\d{4})\s*(?:[-/.]|年)\s*(\d{1,2})\s*(?:[-/.]|月)\s*(\d{1,2})(?!\d)\s*日?"
)
# Day-month-year with digits: 26.11.2026, 28/10/2021, 26-11-2026.
_DMY_RE = re.compile(r"(?<!\d)(\d{1,2})\s*([-/.])\s*(\d{1,2})\s*\2\s*(\d{4}|\d{2})(?![\d:])")
_TIME_RE = re.compile(
    r"(?<![\d.:])(\d{1,2})\s*(?:[:.h]|時)\s*(\d{2})(?:\s*(?:[:.]|分)\s*(\d{2}))?(?![\d])"
    r"(?:\s*(?:分|秒))?(?:\s*(a\.?\s?m\.?|p\.?\s?m\.?)(?![a-z]))?",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"[^\W\d_]+")
_NUM_RE = re.compile(r"(?<!\d)\d{1,4}(?!\d)")


def _fold(text: str) -> str:
    """Case-fold and strip combining accents so 'Října' and 'rijna' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _month_of(token: str) -> int | None:
    folded = _fold(token)
    for stem, month in _STEMS:
        if folded.startswith(_fold(stem)):
            return month
    return None


def _zone(text: str, default_tz: tzinfo) -> tzinfo:
    """The first UTC offset or known zone name in ``text`` (which follows the time)."""
    m = re.search(r"(?:\b(?:GMT|UTC|UT)\s*)?(?<![\w+-])([+-])(\d{1,2})(?::?(\d{2}))?(?!\d)", text)
    if m:
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if len(m.group(2)) <= 2 and hours <= 14 and minutes < 60:
            sign = -1 if m.group(1) == "-" else 1
            return timezone(sign * timedelta(hours=hours, minutes=minutes))
    m = re.search(r"\b(?:GMT|UTC)([+-])(\d{1,2})(?::?(\d{2}))?(?!\d)", text)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3) or 0)))
    for word in re.findall(r"\b[A-Z]{1,5}\b", text):
        if word in _ZONE_NAMES:
            return timezone(timedelta(minutes=_ZONE_NAMES[word]))
    return default_tz


def _build(
    year: int, month: int, day: int, hh: int, mm: int, ss: int, tz: tzinfo
) -> datetime | None:
    if year < 100:
        year += 2000 if year < 70 else 1900
    try:
        return datetime(year, month, day, hh, mm, ss, tzinfo=tz)
    except ValueError:
        return None


def parse_forward_date(text: str, default_tz: tzinfo) -> datetime | None:
    """Read a localized date written by a mail client; ``None`` when no date is found."""
    if not text or not text.strip():
        return None
    text = unicodedata.normalize("NFKC", text).replace("\u00a0", " ").strip()
    if _RFC5322_RE.match(text):
        try:
            parsed = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=default_tz)

    year = month = day = None
    rest = text
    m = _YMD_RE.search(rest)
    if m:
        year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
        rest = rest[: m.start()] + " " + rest[m.end():]
    else:
        for m2 in _DMY_RE.finditer(rest):
            first, second = int(m2.group(1)), int(m2.group(3))
            if min(first, second) > 12 or first == 0 or second == 0:
                continue  # "14.25.08" is a time, not a date
            year = int(m2.group(4))
            # European order is the common one in forwards (Outlook 2019 "28/10/2021");
            # swap only when the second number cannot be a month (US "10/28/2021").
            day, month = (second, first) if second > 12 >= first else (first, second)
            rest = rest[: m2.start()] + " " + rest[m2.end():]
            break

    hh = mm = ss = 0
    after_time = rest
    tm = _TIME_RE.search(rest)
    if tm:
        hh, mm, ss = int(tm.group(1)), int(tm.group(2)), int(tm.group(3) or 0)
        ampm = (tm.group(4) or "").replace(".", "").replace(" ", "").lower()
        if "午後" in rest and hh < 12:
            ampm = "pm"
        elif "午前" in rest and hh == 12:
            ampm = "am"
        if ampm == "pm" and hh < 12:
            hh += 12
        elif ampm == "am" and hh == 12:
            hh = 0
        if hh > 23 or mm > 59 or ss > 60:
            return None
        ss = min(ss, 59)
        after_time = rest[tm.end():]
        rest = rest[: tm.start()] + " " + rest[tm.end():]

    if month is None:
        # Month name: choose the month word closest to the 4-digit year, so that the
        # weekday "mar." (Spanish/French Tuesday) does not win over "nov.".
        words = [(w.start(), w.group()) for w in _WORD_RE.finditer(rest)]
        numbers = [(n.start(), n.group()) for n in _NUM_RE.finditer(rest)]
        years = [(pos, int(val)) for pos, val in numbers if len(val) == 4]
        candidates = [(pos, mon, w) for pos, w in words if (mon := _month_of(w)) is not None]
        if not candidates or not years:
            return None
        ypos, year = years[0]
        pos, month, _word = min(candidates, key=lambda c: abs(c[0] - ypos))
        small = [(p, int(v)) for p, v in numbers if len(v) <= 2 and 1 <= int(v) <= 31]
        if not small:
            return None
        # The day is the small number nearest to the month word.
        day = min(small, key=lambda n: abs(n[0] - pos))[1]
    if year is None or day is None:
        return None
    tz = _zone(after_time, default_tz) if tm else _zone(rest, default_tz)
    return _build(year, month, day, hh, mm, ss, tz)
