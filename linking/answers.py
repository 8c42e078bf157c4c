"""Reading a user's answer to a "which deal?" question from the text they wrote.

The handler of ``+choice-<token>`` replies (``mta.handlers.choice``) takes the reply's own text
(``linking.replytext.extract_reply_from_message``: quoted question and signature removed) and
asks this module what it says. Pure functions, no I/O.

One question (one pending email) accepts, after Unicode NFKC normalisation (so full-width
``２`` and ``＃２`` read as ``2`` and ``#2``):

* the number of a choice: ``2``, ``#2``, ``2.``, ``(2)``, ``deal 2``, ``no. 2``, ``2番``;
* ``0`` / ``none`` / ``no deal`` / ``なし`` / ``該当なし``: no deal;
* the deal's id: ``id 42`` always; a bare number only when it is not a choice number (a
  choice number wins, since the question asks for the number);
* a unique part of a deal's title (case-insensitive), e.g. ``upsell``.

A question listing several emails (a batch) accepts ``1: 2, 2: 0``, or one ``N: answer`` per
line, or exactly one bare answer per line in the order of the items.

Anything else gives an ``unclear`` answer, several matching titles an ``ambiguous`` one, each
with a sentence saying what was understood.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Answer", "Answers", "Candidate", "read_answer", "read_answers"]


@dataclass(frozen=True)
class Candidate:
    deal_id: int
    title: str


@dataclass(frozen=True)
class Answer:
    """What one answer says. ``kind``: deal | none | unclear | ambiguous."""

    kind: str
    text: str
    deal_id: int | None = None
    matches: tuple[int, ...] = ()  # deal ids an ambiguous title matched
    why: str = ""

    @property
    def decided(self) -> bool:
        return self.kind in ("deal", "none")


@dataclass
class Answers:
    """Answers of a whole reply: item number (1-based) -> answer, and what could not be read."""

    by_item: dict[int, Answer] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


_NONE_WORDS = frozenset({
    "0", "none", "no deal", "no", "nothing", "neither", "no one", "none of them", "nil",
    "なし", "無し", "ナシ", "ない", "無い", "該当なし", "該当無し", "案件なし", "どれでもない",
    "いいえ", "なしです", "無しです", "ありません",
})
# "deal 2", "#2", "2.", "(2)", "no. 2", "option 2", "案件2", "2番", "2番です", "2です".
_NUMBER_RE = re.compile(
    r"^(?:(?:deal|number|no|nr|option|choice|item|案件|番号)\s*\.?\s*)?[#(\[]?\s*(\d{1,18})\s*"
    r"[)\]]?\s*(?:番目?|です|でお願いします|お願いします|で|を)*\s*[.!。！]?$",
    re.IGNORECASE,
)
_ID_RE = re.compile(r"^(?:deal\s*)?id\s*[:#]?\s*(\d{1,18})\s*[.!。]?$", re.IGNORECASE)
# "1: 2", "1 = none", "#2: upsell", "1) 2" is not accepted (it reads like a list of choices).
_ITEM_RE = re.compile(r"^\s*(?:item\s*)?#?(\d{1,3})\s*[:=]\s*(.*?)\s*$", re.IGNORECASE)
_ITEM_SPLIT_RE = re.compile(r"\s*[,;、]\s*(?=(?:item\s*)?#?\d{1,3}\s*[:=])", re.IGNORECASE)
_TRAILING_RE = re.compile(r"[\s.!。！、,]+$")
_MIN_TITLE_PART = 3


def _norm(text: str) -> str:
    """NFKC (full-width digits and signs become ASCII), spaces collapsed, case-folded."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def read_answer(text: str, candidates: Sequence[Candidate]) -> Answer:
    """The answer to one question whose choices are ``candidates`` (numbered from 1)."""
    shown = " ".join(text.split())[:200]
    norm = _TRAILING_RE.sub("", _norm(text))
    if not norm:
        return Answer("unclear", shown, why="the reply has no text above the quoted question")
    if norm in _NONE_WORDS:
        return Answer("none", shown)
    m = _ID_RE.match(norm)
    if m:
        deal = int(m.group(1))
        if any(c.deal_id == deal for c in candidates):
            return Answer("deal", shown, deal_id=deal)
        return Answer("unclear", shown, why=f"deal id {deal} is not one of the choices")
    m = _NUMBER_RE.match(norm)
    if m:
        n = int(m.group(1))
        if n == 0:
            return Answer("none", shown)
        if 1 <= n <= len(candidates):
            return Answer("deal", shown, deal_id=candidates[n - 1].deal_id)
        if any(c.deal_id == n for c in candidates):
            return Answer("deal", shown, deal_id=n)
        return Answer("unclear", shown,
                      why=f"{n} is not a choice (the choices are 0 to {len(candidates)})")
    return _by_title(norm, shown, candidates)


def _by_title(norm: str, shown: str, candidates: Sequence[Candidate]) -> Answer:
    titles = [(c, _norm(c.title)) for c in candidates]
    exact = [c for c, t in titles if t == norm]
    if len(exact) == 1:
        return Answer("deal", shown, deal_id=exact[0].deal_id)
    hits = [c for c, t in titles
            if (len(norm) >= _MIN_TITLE_PART and norm in t) or (t and t in norm)]
    if len(hits) == 1:
        return Answer("deal", shown, deal_id=hits[0].deal_id)
    if len(hits) > 1:
        return Answer("ambiguous", shown, matches=tuple(c.deal_id for c in hits),
                      why=f"{shown!r} matches several deals: "
                          + ", ".join(repr(c.title) for c in hits))
    return Answer("unclear", shown, why=f"{shown!r} is neither a choice number nor part of "
                                        "a deal title")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in unicodedata.normalize("NFKC", text).splitlines() if ln.strip()]


def read_answers(text: str, items: Sequence[Sequence[Candidate]]) -> Answers:
    """The answers of a reply to a question listing ``items`` (each its list of choices)."""
    out = Answers()
    count = len(items)
    lines = _lines(text)
    entries: list[tuple[int, str]] = []
    loose: list[str] = []
    for line in lines:
        for chunk in _ITEM_SPLIT_RE.split(line):
            m = _ITEM_RE.match(chunk)
            if m is not None and (count > 1 or m.group(2)):
                entries.append((int(m.group(1)), m.group(2)))
            else:
                loose.append(chunk)
    if entries:
        for number, answer in entries:
            if not 1 <= number <= count:
                out.problems.append(f"there is no email {number} in this question "
                                    f"(they are numbered 1 to {count})")
                continue
            if number in out.by_item:
                out.problems.append(f"email {number} is answered twice; the first answer "
                                    "counts")
                continue
            out.by_item[number] = read_answer(answer, items[number - 1])
        return out
    if count == 1:
        if not lines:
            out.by_item[1] = read_answer("", items[0])
            return out
        whole = read_answer(" ".join(lines), items[0])
        # "2\nthanks" (a sign-off the trimmer kept): the first line is the answer.
        out.by_item[1] = whole if whole.decided else read_answer(lines[0], items[0])
        if not out.by_item[1].decided and whole.kind == "ambiguous":
            out.by_item[1] = whole
        return out
    if len(loose) == count:
        for number, answer in enumerate(loose, start=1):
            out.by_item[number] = read_answer(answer, items[number - 1])
        return out
    if not lines:
        out.problems.append("the reply has no text above the quoted question")
    else:
        out.problems.append(f"this question lists {count} emails: answer each with its "
                            "number, e.g. \"1: 2, 2: 0\"")
    return out

