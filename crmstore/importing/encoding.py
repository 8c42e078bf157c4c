"""The encoding of a CSV export: UTF-8 with or without a byte-order mark, UTF-16 with one,
Shift_JIS/CP932 from Japanese spreadsheets, else Windows-1252."""

from __future__ import annotations

import codecs
import re

_NON_ASCII_RUN_RE = re.compile(r"[^\x00-\x7f]+")


# What CP932 text of a Japanese spreadsheet decodes to: kana, kanji, full-width forms, and the
# JIS X 0208 symbols (※, ①, ■, ★, ×, °...), which CP932 maps to these code points.
_JAPANESE_RANGES = (
    (0x3000, 0x30FF),  # CJK punctuation, hiragana, katakana
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # kanji
    (0xFF01, 0xFF9F), (0xFFE0, 0xFFE5),  # full-width forms, half-width katakana
    (0x2010, 0x203B), (0x2100, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x26FF),  # symbols
    (0x3200, 0x33FF),  # enclosed and squared CJK (㈱, ㎡)
)
_JAPANESE_LATIN1 = frozenset("§¨°±´¶×÷")


def _is_japanese(ch: str) -> bool:
    o = ord(ch)
    return ch in _JAPANESE_LATIN1 or any(lo <= o <= hi for lo, hi in _JAPANESE_RANGES)


def _plausible_cp932(text: str) -> bool:
    """Whether text decoded as CP932 reads as Japanese rather than as Windows-1252 bytes that
    happen to form valid CP932 (``São Paulo`` -> ``S縊 Paulo``, ``Øresund`` -> ``ﾘresund``).

    Windows-1252 accents come one at a time inside Latin words, so misread they give runs
    of one character glued to an ASCII letter; Japanese comes in runs of several characters
    (names, 株式会社). CP932 is chosen when all non-ASCII runs are Japanese characters, none
    is private-use (CP932 lead bytes 0xF0-0xF9), and at most a quarter are such one-character
    runs (``A社`` exists in Japanese, but not as the whole file)."""
    runs = suspicious = 0
    n = len(text)
    for match in _NON_ASCII_RUN_RE.finditer(text):  # skips the ASCII bulk at C speed
        run = match.group()
        runs += 1
        if not all(_is_japanese(ch) for ch in run):
            return False
        if len(run) == 1:
            before = text[match.start() - 1] if match.start() > 0 else ""
            after = text[match.end()] if match.end() < n else ""
            if (before.isascii() and before.isalpha()) or (after.isascii() and after.isalpha()):
                suspicious += 1
    return runs > 0 and suspicious * 4 <= runs


def detect_encoding(data: bytes) -> str:
    """The encoding of a CSV export: ``utf-8-sig`` (BOM, as Excel writes "CSV UTF-8"),
    ``utf-16`` (BOM, Excel's "Unicode text"), ``utf-8`` when the bytes are valid UTF-8,
    ``cp932`` when they are valid CP932 and read as Japanese (Excel's CSV on a Japanese
    Windows), else ``cp1252`` (which decodes any byte, so the admin sees mojibake in names
    rather than a refusal; ``--encoding`` overrides)."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp932")
    except UnicodeDecodeError:
        return "cp1252"
    return "cp932" if _plausible_cp932(text) else "cp1252"
