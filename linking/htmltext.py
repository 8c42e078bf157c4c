"""HTML to plain text that keeps line structure, for finding forwards in HTML-only mail.

Forward detection works on lines ("From: …" on its own line, a separator line), so the
conversion must turn block elements into line breaks and table cells into spaces on the
same line (Thunderbird and Outlook lay the forwarded header block out as a table:
``<tr><th>Subject:</th><td>…</td></tr>``). It uses the standard library's tokenizing
HTML parser, never regular expressions over markup, so comments, CDATA, attributes
holding ``>`` and unclosed tags are handled the way browsers do.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

# Elements that start and end a line (HTML Living Standard "block" rendering).
_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "center", "dd", "details", "dialog", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4",
    "h5", "h6", "header", "li", "main", "nav", "ol", "p", "pre", "section", "summary",
    "table", "tbody", "thead", "tfoot", "tr", "ul", "caption",
})
_CELL_TAGS = frozenset({"td", "th"})
# Content that is never shown to the reader.
_SKIP_TAGS = frozenset({"style", "script", "head", "title", "template", "noscript", "xml"})
_VOID_SKIP = frozenset({"meta", "link", "base"})
_RULE = "_" * 32
_SPACES_RE = re.compile(r"[ \t\r\n\f]+")


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def _newline(self) -> None:
        self.parts.append("\n")

    def _ensure(self, count: int) -> None:
        """End the current line for a block boundary: adjacent boundaries ("</div><div>")
        give one line break, a paragraph (which browsers render with margins) a blank line."""
        tail = "".join(self.parts[-4:]).rstrip(" ")
        have = len(tail) - len(tail.rstrip("\n"))
        if not "".join(self.parts).strip():
            return
        self.parts.append("\n" * max(0, count - have))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_SKIP:
            return
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
            return
        if tag == "br":
            self._newline()
        elif tag == "hr":
            # A horizontal rule is shown as a line of its own (as text browsers do); Outlook
            # puts one above a forwarded header block, where plain text has "_____".
            self._ensure(1)
            self.parts.append(_RULE + "\n")
        elif tag in _BLOCK_TAGS:
            self._ensure(2 if tag == "p" else 1)
            if tag == "pre":
                self.pre_depth += 1
        elif tag in _CELL_TAGS:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" or tag in _BLOCK_TAGS:
            self._newline()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if tag in _BLOCK_TAGS:
            self._ensure(2 if tag == "p" else 1)
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)
        elif tag in _CELL_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:
            self.parts.append(data.replace("\r\n", "\n"))
        else:
            # HTML collapses runs of white space (CSS white-space: normal); a no-break
            # space is kept as a plain space so that "From:&nbsp;x" still reads "From: x".
            self.parts.append(_SPACES_RE.sub(" ", data).replace("\u00a0", " "))


def html_to_text(html: str) -> str:
    """Visible text of ``html`` with one line per block element; entities decoded, no
    trailing spaces, at most one empty line in a row, no leading/trailing empty lines."""
    collector = _TextCollector()
    try:
        collector.feed(html)
        collector.close()
    except (AssertionError, ValueError):  # pragma: no cover - html.parser is lenient
        pass
    lines = [
        re.sub(r"[ \t]{2,}", " ", line).strip(" \t")
        for line in "".join(collector.parts).split("\n")
    ]
    out: list[str] = []
    for line in lines:
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
