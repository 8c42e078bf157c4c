"""Reply-text extraction: the text the sender actually wrote in a reply.

dealmail asks "which deal?" by email and reads the answer ("2", "#2", "なし", ...) from the
reply; notes sent by users are stored as written.  Both need the sender's own words with the
quoted history and the signature removed.  This module is pure (no I/O, no global state).

Algorithm (own implementation; ideas and several splitter patterns come from GitHub's
``email_reply_parser`` (MIT), Zapier's Python port (MIT) and Mailgun's ``talon``
``quotations.py`` (Apache-2.0), which classify lines as text / quotation marker / splitter):

1. Lines starting with ``>`` are quotations (RFC 3676 section 4.5 quoting).
2. A *splitter* is an attribution ("On <date>, <name> wrote:" and its translations, possibly
   wrapped over up to three lines, or any line ending in ":" that names an address or a
   date and time and is followed by a quotation), a separator line ("-----Original
   Message-----" and its translations), a block of From:/Sent:/To:/Subject: header fields
   (Outlook and most webmails, in any of the languages :mod:`linking.forwards` knows),
   GroupWise's ">>> Name <address> date >>>" line, or a "reply above this line" delimiter.
   When a splitter is followed by quoted lines, the splitter and the quotation are removed
   and the text after them is kept (bottom-posting and inline answers); when it is followed
   by unquoted text, everything from the splitter down is removed.
3. A forwarded message that comes before any splitter ("---------- Forwarded message
   ---------" with its header block) is the sender's content, as in talon; the quoted
   history found after it is still removed.
4. A signature is removed: the "-- " delimiter (RFC 3676 section 4.3) and what follows, a
   mobile trailer ("Sent from my iPhone", "Get Outlook for iOS<https://aka.ms/…>",
   "iPhoneから送信", ...), a trailing sign-off block ("Thanks,\\nAlex", "Mit freundlichen
   Grüßen" with the name, title, address and legal lines under it, "よろしくお願いします。")
   and a "-Name" line.  A reply that is only a quote, or only a signature, is "".

HTML bodies are converted to text with :mod:`html.parser`; ``<blockquote>`` and the quote
containers of common clients become quoted lines, the Outlook reply markers end the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from html.parser import HTMLParser

from .forwards import header_block_at, separator_kind
from .parse import part_text

__all__ = ["extract_reply", "extract_reply_from_message", "html_to_reply"]

# --- patterns -----------------------------------------------------------------------------

_QUOTE_RE = re.compile(r"^[ \t]*>")
# Characters with no glyph that clients put around names, addresses and whole RTL lines
# (byte order mark, zero-width space, the bidirectional marks, embeddings and isolates of
# Unicode's bidi algorithm (UAX #9)): removed so that "‫… نوشت:‬" ends with its colon.
_INVISIBLE_RE = re.compile("[\ufeff\u200b\u200e\u200f\u061c\u202a-\u202e\u2060\u2066-\u2069]")
# GroupWise's quote marker: ">>> Dana Lee <dana@x> 11/26/2026 10:03 AM >>>", with the
# original below it unquoted.
_GROUPWISE_RE = re.compile(r"^[ \t]*>>>[ \t]+[^\n]{3,300}?[ \t]+>>>[ \t]*$")

# Verbs that end an attribution line ("... wrote:"), by language: Gmail, Apple Mail,
# Thunderbird, Outlook for Mac, Yahoo, Mail.ru, The Bat!, Lotus Notes and others (talon's
# RE_ON_DATE_SMB_WROTE, extended).  A "(a)" or "(-ла)" gender suffix may follow.
_VERBS = (
    r"wrote|sent|writes|wrote\s+on"
    r"|a\s+écrit|a\s+ecrit|écrit"
    r"|schrieb|hat\s+geschrieben|geschrieben|Folgendes\s+geschrieben"
    r"|escribió|escribio|escreveu|va\s+escriure"
    r"|ha\s+scritto|scrisse"
    r"|schreef|geschreven|het\s+volgende\s+geschreven|verzond"
    r"|napisał|napisal|pisze|skrev|skrev\s+følgende|följande|kirjoitti|kirjutas"
    r"|napsal|napísal|napisao\s+je|napisala\s+je|je\s+napisal|je\s+napisala"
    r"|написал|написала|написав|написа|пишет|пише|писал|писали|yazdı|yazmış"
    r"|şunu\s+yazdı|şunları\s+yazdı|írta|ezt\s+írta|a\s+scris|rašė|rakstīja"
    r"|έγραψε|đã\s+viết|menulis|כתב|كتب|เขียนว่า"
    r"|님이\s*작성|작성|のメッセージ|のメール|が書きました|は書きました|書きました|写道|寫道"
)
_VERB_END_RE = re.compile(
    rf"(?:{_VERBS})(?:\s*\(\s*-?\w{{1,3}}\s*\))?\s*[:：]?\s*-*\s*$", re.IGNORECASE
)
# German/Dutch/Danish put the verb before the sender: "Am ... schrieb Alice <a@x>:".
_VERB_MID_RE = re.compile(
    r"\b(?:schrieb|schreef|escribió|skrev|heeft)\b.{1,160}[:：]\s*$", re.IGNORECASE
)
# Words that open an attribution ("On", "Le", "Am", ...).
_ATTRIB_START_RE = re.compile(
    r"^\s*[-—>*]*\s*(?:On|Le|Am|El|Em|Op|Il\s+giorno|Il|W\s+dniu|Dnia|Den|På|Vào|Dne|В|Kun"
    r"|Pada|Στις|בתאריך|A|Às|Ar)\s",
    re.IGNORECASE,
)
# A date opening a line: "02.04.2012 14:20 ...", "2014-10-17 11:28 ...", "2026年11月26日",
# "2026년 11월 26일", "2026. 11. 26.", and a weekday before a day: "Thu, 26 Jun 2014",
# "czw., 26 lis 2026", "čt 26. 11. 2026", "tor. 26. nov. 2026", "чт, 26 нояб. 2026".
_DATE_START_RE = re.compile(
    r"^\s*(?:\d{1,4}[./-]\d{1,2}[./-]\d{1,4}|\d{4}\s*年\s*\d{1,2}\s*月\s*\d{1,2}\s*日"
    r"|\d{4}\s*년\s*\d{1,2}\s*월|\d{4}\.\s?\d{1,2}\.\s?\d{1,2}\."
    r"|[^\W\d_]{1,10}\.?,?\s+\d{1,2}\.?\s+(?:\d{1,2}\.\s*\d{4}|[^\W\d_]{3,10}\.?\s+\d{4})\b"
    r"|[^\W\d_]{3,10}\.?,\s+[^\W\d_]{3,10}\s+\d{1,2},?\s+\d{4}\b)"
)
_EMAIL_RE = re.compile(r"[^\s<>()\"'\[\]]+@[^\s<>()\"'\[\]]+\.\w+")
_TIME_RE = re.compile(r"(?<!\d)\d{1,2}\s?[:.h時]\s?\d{2}(?!\d)")
_DATEISH_RE = re.compile(
    r"(?<!\d)(?:19|20)\d{2}(?!\d)|(?<!\d)\d{1,2}[./-]\d{1,2}[./-]\d{2,4}(?!\d)"
)
# "Here is what I sent:" introduces the writer's own quote, not someone else's message.
_SENT_END_RE = re.compile(r"\bsent\s*[:：]\s*$", re.IGNORECASE)
_DASH_SENT_RE = re.compile(rf"^\s*-{{2,}}.*\b(?:{_VERBS})\b.*-{{2,}}\s*$", re.IGNORECASE)
# "reply above this line" delimiters of help desks and notification mails, by language.
_ABOVE_LINE_RE = re.compile(
    r"(?:reply|respond|write|type)\b.{0,40}\babove\s+this\s+line|above\s+this\s+line"
    r"|oberhalb\s+dieser\s+zeile|über\s+dieser\s+zeile|au-dessus\s+de\s+cette\s+ligne"
    r"|por\s+encima\s+de\s+esta\s+l[ií]nea|sopra\s+questa\s+(?:riga|linea)"
    r"|boven\s+deze\s+regel|acima\s+desta\s+linha|powyżej\s+tej\s+linii"
    r"|выше\s+этой\s+строки|ovanför\s+denna\s+rad|over\s+denne\s+linje"
    r"|tämän\s+rivin\s+yläpuolelle|nad\s+tímto\s+řádkem|e\s+sor\s+fölé"
    r"|bu\s+satırın\s+üstüne|この行より上|此行以上|이\s*줄\s*위에",
    re.IGNORECASE,
)
# A line made of rule characters only: "_____", "=====", "*****", "-----".
_RULE_LINE_RE = re.compile(r"^\s*[-_=*~#]{3,}\s*$")
_DECORATED_RE = re.compile(r"[-_=*~#]{2,}")

# Mobile and app trailers: "Sent from my iPhone", "Envoyé de mon iPhone", "iPhoneから送信",
# "Get Outlook for iOS<https://aka.ms/o0ukef>", "Von meinem Samsung Galaxy Smartphone
# gesendet." A short line holding a send verb (any of these languages) and a device or app
# name, optionally with the app's link.
_DEVICE = (
    r"iPhone|iPad|iOS|Android|Galaxy|Samsung|BlackBerry|Outlook|Mail\s+for\s+Windows"
    r"|Mail\s+für\s+Windows|Yahoo|Proton|Huawei|Xiaomi|Pixel|smartphone|mobile|móvil"
    r"|Handy|phone|tablet|Gmail|AOL|Spark|Superhuman|Windows"
    r"|手机|手機|携帯|スマートフォン|华为|小米|아이폰|갤럭시|휴대폰"
)
_SEND_WORDS = (
    r"sent|envoyé|envoye|gesendet|enviado|enviada|inviato|inviata|verzonden|verstuurd"
    r"|wysłane|wysłano|odesláno|odoslané|отправлено|надіслано|skickat|sendt|lähetetty"
    r"|küldve|gönderildi|trimis|poslano|poslato|send|from\s+my|via|get|obtenir|obtener"
    r"|herunterladen|scarica|downloaden|baixar|hämta|hent|pobierz|скачайте|загрузите"
    r"|enviat|dihantar|dikirim|gửi|στάλθηκε|נשלח|أرسلت|ارسال|ส่งจาก|надіслано|изпратено"
    r"|入手|获取|取得|送信|发自|發自|送自|发送|傳送|보냄|から"
)
_MOBILE_RE = re.compile(
    rf"^\s*(?=.*\b(?:{_SEND_WORDS})\b|.*(?:送信|发自|發自|送自|보냄|から|入手|获取))(?=.*(?:{_DEVICE}))"
    r"(?P<text>[^,;\n]{2,60}?)(?:\s*[<(\[]https?://[^\s>)\]]*[>)\]])?\s*[.!。]?\s*$",
    re.IGNORECASE,
)
# A trailer is a short phrase, not a sentence about a phone ("Sent from my desk, is much
# easier than my mobile phone" is text).
_MOBILE_MAX_WORDS = 7


def _is_mobile_trailer(line: str) -> bool:
    m = _MOBILE_RE.match(line)
    return m is not None and len(m.group("text").split()) <= _MOBILE_MAX_WORDS


# Closing phrases that open a sign-off block.  _THANKS are also whole answers on their own
# ("Thanks!"), _CLOSINGS never are.
_CLOSINGS = (
    r"cheers|best|all\s+the\s+best|best\s+wishes|(?:best|kind|warm|warmest|kindest)\s+regards"
    r"|regards|rgds|br|sincerely|yours(?:\s+(?:truly|sincerely))?|take\s+care|talk\s+soon"
    r"|see\s+you|thanks\s*(?:&|and)\s*regards|cordialement|bien\s+cordialement|bien\s+à\s+vous"
    r"|amitiés|(?:sincères\s+|meilleures\s+)?salutations|bonne\s+(?:journée|soirée)|à\s+bientôt"
    r"|(?:mit\s+)?(?:(?:freundliche|beste|herzliche|liebe|viele|schöne)n?\s+)?grü(?:ß|ss)e?n?"
    r"|gru(?:ß|ss)|lg|mfg|vg|(?:un\s+cordial\s+)?saludos?(?:\s+cordiales)?|un\s+saludo"
    r"|atentamente|cordialmente|un\s+abrazo|(?:com\s+os\s+)?(?:melhores\s+)?cumprimentos"
    r"|abraços|abraço|atenciosamente|att|(?:cordiali|distinti|cari)\s+saluti|saluti"
    r"|un\s+(?:caro\s+)?saluto|a\s+presto|(?:met\s+)?(?:vriendelijke|hartelijke)\s+groet(?:en)?"
    r"|groeten|groet|groetjes|mvg|(?:med\s+)?vänlig(?:a)?\s+hälsning(?:ar)?"
    r"|bästa\s+hälsningar|hälsningar|mvh|(?:med\s+)?venlig(?:e)?\s+hilsen"
    r"|(?:med\s+)?vennlig(?:e)?\s+hilsen|hilsen|(?:de\s+)?bedste\s+hilsner"
    r"|ystävällisin\s+terveisin|parhain\s+terveisin|terveisin"
    r"|pozdrawiam(?:\s+serdecznie)?|serdecznie\s+pozdrawiam|z\s+poważaniem|z\s+powazaniem"
    r"|pozdrowienia|s\s+pozdravem|s\s+přátelským\s+pozdravem|s\s+pozdravom|s\s+úctou"
    r"|üdvözlettel|tisztelettel|üdv|saygılarımla|iyi\s+çalışmalar|cu\s+stimă|cu\s+respect"
    r"|lijep\s+pozdrav|srdačan\s+pozdrav|s\s+poštovanjem|lep\s+pozdrav|srdačno|pozdrav"
    r"|с\s+уважением|с\s+наилучшими\s+пожеланиями|всего\s+доброго|з\s+повагою|с\s+уважение"
    r"|поздрави|με\s+εκτίμηση|φιλικά|pagarbiai|ar\s+cieņu|lugupidamisega|trân\s+trọng"
    r"|hormat\s+saya|salam|בברכה|مع\s+التحية|敬具|此致|敬礼|顺祝商祺|祝好"
    r"|よろしくお願いします|よろしくお願いいたします|よろしくお願い致します|宜しくお願いします"
    r"|宜しくお願い致します|以上です|以上"
)
_THANKS = (
    r"thanks|thank\s+you|thanks\s+again|thanks\s+a\s+lot|many\s+thanks|thanks\s+in\s+advance"
    r"|thank\s+you\s+in\s+advance|thx|ty|merci(?:\s+beaucoup)?|danke(?:\s+schön)?|vielen\s+dank"
    r"|gracias|obrigad[oa]|grazie|bedankt|dank\s+je(?:\s+wel)?|tack|tak|takk|kiitos"
    r"|dziękuję|děkuji|ďakujem|köszönöm|teşekkürler|mulțumesc|hvala|спасибо|дякую"
    r"|ευχαριστώ|ačiū|paldies|aitäh|cảm\s+ơn|terima\s+kasih|תודה|شكرا|ありがとうございます"
    r"|谢谢|謝謝|감사합니다|고맙습니다"
)
_SIGNOFF_PHRASES = rf"{_CLOSINGS}|{_THANKS}"
_SIGNOFF_RE = re.compile(
    rf"^\s*(?:{_SIGNOFF_PHRASES})(?:\s*[,、]?\s*(?:{_SIGNOFF_PHRASES}))?\s*[,.!:。！、]*"
    r"(?:\s*[,、]?\s*(?P<name>[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,2})\.?)?\s*$",
    re.IGNORECASE,
)
_CLOSING_RE = re.compile(rf"^\s*(?:{_CLOSINGS})\b", re.IGNORECASE)
_DASH_NAME_RE = re.compile(r"^\s*-[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,2}\.?\s*$")
_SIG_DELIM_RE = re.compile(r"^(?:--|-- |_{2,}|—)\s*$")
_DASH_RULE_RE = re.compile(r"^\s*[-=]{4,}\s*$")
_NAME_LINE_RE = re.compile(r"^[^\W\d_][\w.'-]*(?:\s+[^\W\d_][\w.'-]*){0,3}$")
_CONTACT_RE = re.compile(
    r"[^\s@]+@[^\s@]+\.\w+|https?://|www\.|\+?\(?\d{2,4}\)?[\s.-]\d{2,4}[\s.-]\d{2,4}"
    r"|^\s*(?:tel|phone|mobile|mob|fax|skype|t|f|m|tél|телефон|тел|моб|tlf|puh)\s*[.:]",
    re.IGNORECASE,
)
# Legal footers under a signature ("CONFIDENTIALITY NOTICE: ...", "Geschäftsführer: ...").
_DISCLAIMER_RE = re.compile(
    r"confidential|privileged|intended\s+recipient|disclaimer|vertraulich|empfänger"
    r"|confidentiel|destinataire|riservat|confidencial|destinatario|poufn|конфиденциальн"
    r"|geschäftsführ|amtsgericht|handelsregister|registergericht|ust-id|hrb\s|krs|nip|regon"
    r"|инн|огрн|kvk|btw|siret|rcs\s|p\.\s?iva|cif|nif",
    re.IGNORECASE,
)
_SEPARATOR_RE = re.compile(r"^\s*[-_=*—–]*\s*$")
# An "On <date> ... wrote:" written after reply text on the same line (talon's
# _wrap_splitter_with_newline): split it onto its own line.
# Only the end of a line is searched, with bounded repetitions, so that a long line cannot
# make the regex backtrack for long (GitHub's pathological.txt is such a trap).
_INLINE_ATTRIB_RE = re.compile(
    rf"(?:(?<=\S)-+\s*|\s+-*\s*)(?P<attr>(?:On|Le|Am|El|Op)\s[^\n]{{0,250}}?\d[^\n]{{0,250}}?"
    rf"(?:{_VERBS})\s*[:：]?\s*-*)\s*$",
    re.IGNORECASE,
)
_INLINE_ATTRIB_WINDOW = 400
# Lines after this are not examined: the sender's text comes first, and talon stops at 1000.
_MAX_LINES = 5000
_LINK_OPEN_RE = re.compile(r"(?:\(|<)https?://[^)>\s]*$")

# An attribution is at most this many lines (Gmail wraps a long one over two or three).
_ATTRIB_MAX_LINES = 3
_ATTRIB_MAX_LINES_BY_WORD = 6
_SHORT_ATTRIB_CHARS = 100
_ATTRIB_MAX_CHARS = 400
_SIGNOFF_MAX_TAIL_LINES = 4
_SIGNOFF_TAIL_LINE_MAX = 60
# A signature block under a closing phrase: name, title, company, address, phones, web,
# register and legal lines (German, Polish and Russian business mail run to 10-15 lines).
_SIGBLOCK_MAX_LINES = 16
_SIGBLOCK_LINE_MAX = 90


# --- plain text -----------------------------------------------------------------------------


def extract_reply(text: str) -> str:
    """The visible text the sender wrote in a plain-text reply.

    Quoted lines (``> ...``), attribution and header blocks that introduce a quoted message
    (in many languages and clients) with everything below them, and signatures are removed;
    the result is stripped of surrounding whitespace.  A reply that only quotes returns "".
    """
    lines = _split_lines(text)
    return _extract_lines(lines, [False] * len(lines))


def _split_lines(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE_RE.sub("", text)
    out: list[str] = []
    for line in text.split("\n")[:_MAX_LINES]:
        if _QUOTE_RE.match(line) or _ATTRIB_START_RE.match(line):
            out.append(line)
            continue
        offset = max(0, len(line) - _INLINE_ATTRIB_WINDOW)
        m = _INLINE_ATTRIB_RE.search(line, offset)
        pre = line[: m.start()].rstrip() if m else ""
        if m and pre.strip():
            out.extend([pre, m.group("attr").strip()])
        else:
            out.append(line)
    return out


def _is_blank(line: str) -> bool:
    return not line.strip()


def _dated(text: str) -> bool:
    """Holds a date and a time ("26.11.2026 10:03", "2026. nov. 26., Cs, 10:03")."""
    return bool(_TIME_RE.search(text)) and bool(_DATEISH_RE.search(text))


def _starts_attribution(line: str) -> bool:
    return bool(_ATTRIB_START_RE.match(line) or _DATE_START_RE.match(line))


def _is_attribution(joined: str, quoted_below: bool) -> bool:
    """Whether ``joined`` (one attribution, its wrapped lines joined) introduces a quote."""
    if len(joined) > _ATTRIB_MAX_CHARS:
        return False
    has_email = bool(_EMAIL_RE.search(joined))
    verb_end = bool(_VERB_END_RE.search(joined))
    colon_end = joined.rstrip().endswith((":", "："))
    if (
        _ATTRIB_START_RE.match(joined)
        and re.search(r"\d", joined)
        and (verb_end or _VERB_MID_RE.search(joined))
    ):
        return True
    if _DATE_START_RE.match(joined) and (verb_end or (has_email and (colon_end or quoted_below))):
        return True
    # "Sent from Samsung Mobile Name <a@x> wrote:", "Dana <d@x> wrote on 26.11.2026 10:03:"
    if has_email and verb_end:
        return True
    # "Thursday, November 26, 2026, 10:03:12 AM, you wrote:" (The Bat!)
    if verb_end and _dated(joined):
        return True
    # "Dana Lee wrote:" right above a quotation (Thunderbird's short form, SquirrelMail).
    if (
        quoted_below
        and colon_end
        and verb_end
        and len(joined) <= _SHORT_ATTRIB_CHARS
        and not _SENT_END_RE.search(joined)
    ):
        return True
    # Any client, any language: a line ending in ":" that names the author's address, or a
    # date and a time, right above a quotation ("Name <a@x> ezt írta (időpont: …):",
    # "* Dana <d@x> [2026-11-26 10:03]:", "Вы писали 26 ноября 2026 г., 10:03:12:").
    return quoted_below and colon_end and (has_email or _dated(joined))


def _attribution_len(lines: list[str], forced: list[bool], i: int) -> int:
    """Number of lines of an attribution starting at line i, or 0. It may be wrapped over
    up to three lines; one that opens with "On"/"Le"/"Am"… and a date may also run over
    blank lines and ">"-marked lines (talon's polymail case), up to six."""
    first = lines[i]
    if _QUOTE_RE.match(first) or forced[i]:
        return 0
    if _DASH_SENT_RE.match(first):
        return 1
    by_word = bool(_ATTRIB_START_RE.match(first))
    limit = _ATTRIB_MAX_LINES_BY_WORD if by_word else _ATTRIB_MAX_LINES
    parts: list[str] = []
    n = len(lines)
    for j in range(i, min(i + limit, n)):
        line = lines[j].strip()
        if j > i and (len(line) > 160 or (line and _starts_attribution(line))):
            return 0  # line i is text above an attribution that begins on line j
        if not line or (j > i and _is_quoted(lines, forced, j)):
            if not by_word:
                return 0
            line = line.lstrip(">").strip()
            if not line:
                continue
        parts.append(line)
        nxt = _next_nonblank(lines, j + 1)
        quoted_below = nxt is not None and _is_quoted(lines, forced, nxt)
        if _is_attribution(" ".join(parts), quoted_below):
            return j - i + 1
    return 0


def _next_nonblank(lines: list[str], start: int) -> int | None:
    for k in range(start, len(lines)):
        if not _is_blank(lines[k]):
            return k
    return None


_KEY_FIELDS = frozenset({"from", "date"})
_FIELD_ANYWHERE_RE = re.compile(
    r"(?:^|\s|\*)(?P<name>From|Sent|Date|To|Cc|Subject|Von|Gesendet|An|Betreff|Datum|De"
    r"|Envoyé|À|Objet|Da|Inviato|A|Oggetto|Van|Verzonden|Aan|Onderwerp|Od|Wysłano|Do|Temat)"
    r"\s?\*?[:：]\s",
    re.IGNORECASE,
)


def _header_block_len(lines: list[str], i: int) -> int:
    """Number of lines of a From:/Sent:/To:/Subject: block starting at line i, or 0."""
    found = header_block_at(lines, i)
    if found is None:
        return 0
    fields, end = found
    names = set(fields)
    if len(names) < 2:
        # Several fields on one line (HTML rendered "<b>From: x</b> <b>Date: y</b>").
        first = lines[i]
        names |= {f.group("name").lower() for f in _FIELD_ANYWHERE_RE.finditer(first)}
        names = {"from" if n in ("from", "von", "de", "da", "van", "od") else n for n in names}
    if len(names) >= 2 and names & _KEY_FIELDS:
        return end - i
    return 0


@dataclass(frozen=True)
class _Splitter:
    kind: str  # "attribution", "original", "header", "forward", "delimiter"
    length: int


def _splitter_at(lines: list[str], forced: list[bool], i: int) -> _Splitter | None:
    line = lines[i]
    if _QUOTE_RE.match(line) or _is_blank(line):
        return None
    stripped = line.strip()
    if len(stripped) <= 120 and _ABOVE_LINE_RE.search(stripped):
        return _Splitter("delimiter", 1)
    if _RULE_LINE_RE.match(stripped):
        # A rule right above a header block in a language we do not know (Outlook web
        # writes "________________________________" there): read the block by its values.
        k = _next_nonblank(lines, i + 1)
        if k is not None and k - i <= 2 and header_block_at(lines, k) is None:
            found = header_block_at(lines, k, infer=True)
            if found is not None:
                return _Splitter("header", found[1] - i)
        return None
    sep = separator_kind(stripped)
    if sep == "forward":
        return _Splitter("forward", 1)
    if sep == "generic" and _DECORATED_RE.search(stripped):
        return _Splitter("original", 1)
    n = _attribution_len(lines, forced, i)
    if n:
        return _Splitter("attribution", n)
    n = _header_block_len(lines, i)
    if n:
        return _Splitter("header", n)
    return None


def _quote_run_end(lines: list[str], forced: list[bool], k: int) -> int:
    """End (exclusive) of the run of quoted/blank lines starting at k.

    A single unquoted token between two quoted lines is a wrapped link of the quotation
    (talon's RE_PARENTHESIS_LINK case), not an answer.
    """
    n = len(lines)
    last_quoted = k
    while k < n:
        if forced[k] or _QUOTE_RE.match(lines[k]):
            last_quoted = k
            k += 1
        elif _is_blank(lines[k]) or (
            k + 1 < n
            and (forced[k + 1] or _QUOTE_RE.match(lines[k + 1]))
            and " " not in lines[k].strip()
            and _LINK_OPEN_RE.search(lines[last_quoted])
        ):
            k += 1
        else:
            break
    # leave trailing blank lines to the text that follows
    return last_quoted + 1


def _is_quoted(lines: list[str], forced: list[bool], k: int) -> bool:
    return forced[k] or bool(_QUOTE_RE.match(lines[k]))


def _forward_header_end(lines: list[str], i: int) -> int:
    """First line after a forward separator at i and the header block under it."""
    k = _next_nonblank(lines, i + 1)
    if k is None:
        return len(lines)
    found = header_block_at(lines, k)
    return found[1] if found else i + 1


def _extract_lines(lines: list[str], forced: list[bool]) -> str:
    """Core: ``forced[i]`` marks lines known to be quoted (from HTML blockquotes)."""
    n = len(lines)
    kept: list[int] = []
    # Quote runs not introduced by a splitter: (start, end)
    loose_runs: list[tuple[int, int]] = []
    saw_splitter = False
    in_forward = False
    i = 0
    while i < n:
        if not forced[i] and _GROUPWISE_RE.match(lines[i]) and _EMAIL_RE.search(lines[i]):
            saw_splitter = True
            break  # GroupWise: the unquoted original follows its ">>> … >>>" marker
        if _is_quoted(lines, forced, i):
            end = _quote_run_end(lines, forced, i)
            loose_runs.append((i, end))
            kept.extend(range(i, end))
            i = end
            continue
        sp = _splitter_at(lines, forced, i)
        if sp is None:
            kept.append(i)
            i += 1
            continue
        if sp.kind == "forward" and (in_forward or not saw_splitter):
            # A forward, not a reply: the forwarded message is the sender's content
            # (forwards are parsed elsewhere); its header block is not quoted history.
            in_forward = True
            end = _forward_header_end(lines, i)
            kept.extend(range(i, end))
            i = end
            continue
        if sp.kind == "forward":
            kept.append(i)
            i += 1
            continue
        if in_forward and sp.kind == "header":
            # A nested forward's header block inside the forwarded content.
            kept.extend(range(i, i + sp.length))
            i += sp.length
            continue
        saw_splitter = True
        after = i + sp.length
        nxt = _next_nonblank(lines, after)
        if sp.kind != "delimiter" and nxt is not None and _is_quoted(lines, forced, nxt):
            # Attribution followed by a quotation: drop both, keep what follows (answers
            # written below or between quotations).
            i = _quote_run_end(lines, forced, nxt)
            continue
        # Unquoted history (Outlook, webmail): everything from here down is not the reply.
        break
    drop: set[int] = set()
    quoted_nonblank = sum(
        1 for s, e in loose_runs for k in range(s, e) if _is_quoted(lines, forced, k)
    )
    for s, e in loose_runs:
        has_forced = any(forced[k] for k in range(s, e))
        at_end = _next_nonblank(lines, e) is None or all(k < e for k in kept[-1:])
        # A lone ">" line in running text with no splitter anywhere is text (e.g. ">>> link
        # <<<"), as in talon's rule "no splitter -> markers are text".
        if has_forced or saw_splitter or quoted_nonblank >= 2 or at_end:
            drop.update(k for k in range(s, e) if _is_quoted(lines, forced, k))
    body = _join_kept(lines, [k for k in kept if k not in drop], drop)
    body = _strip_trailing_separators(body)
    body = _strip_signature(body)
    return "\n".join(body).strip()


def _join_kept(lines: list[str], kept: list[int], dropped: set[int]) -> list[str]:
    """The kept lines in order; where removed lines (a quotation, an attribution) sat
    between two blank lines, one blank line is left instead of two."""
    out: list[str] = []
    prev: int | None = None
    for k in kept:
        gap = prev is not None and k > prev + 1
        if gap and out and _is_blank(out[-1]) and _is_blank(lines[k]):
            prev = k
            continue
        out.append(lines[k])
        prev = k
    return out


def _strip_trailing_separators(body: list[str]) -> list[str]:
    end = len(body)
    while end > 0 and _SEPARATOR_RE.match(body[end - 1]):
        end -= 1
    return body[:end]


def _first_nonblank(body: list[str]) -> int | None:
    return _next_nonblank(body, 0)


def _strip_signature(body: list[str]) -> list[str]:
    first = _first_nonblank(body)
    if first is None:
        return []
    if _only_signature(body, first):
        return []
    changed = True
    while changed:
        changed = False
        first = _first_nonblank(body)
        if first is None:
            return []
        cut = _signature_start(body, first)
        if cut is not None and cut > first:
            body = _strip_trailing_separators(body[:cut])
            changed = True
    return body


def _only_signature(body: list[str], first: int) -> bool:
    """Nothing but a signature: it starts with "-- ", a mobile trailer, or a closing
    phrase ("Mit freundlichen Grüßen") with the signature lines under it."""
    line = body[first]
    if _SIG_DELIM_RE.match(line) or _is_mobile_trailer(line):
        return True
    if _CLOSING_RE.match(line) and _SIGNOFF_RE.match(line):
        rest = [r for r in body[first + 1:] if r.strip()]
        return bool(rest) and _signature_block(rest)
    return False


def _is_name_line(line: str) -> bool:
    """A bare personal name: one to four capitalised words, no digits or punctuation."""
    return bool(_NAME_LINE_RE.match(line)) and all(
        w[0].isupper() for w in line.split() if w[0].isalpha()
    )


def _is_contact_line(line: str) -> bool:
    return bool(_CONTACT_RE.search(line))


def _signature_block(lines: list[str]) -> bool:
    """Non-blank lines that read as a signature under a closing phrase: short lines (name,
    title, company, address, phone, web), or legal/confidentiality paragraphs; no question
    and no line that introduces more text."""
    if not lines or len(lines) > _SIGBLOCK_MAX_LINES:
        return False
    for line in lines:
        text = line.strip()
        if text.endswith(("?", "？")):
            return False
        if len(text) > _SIGBLOCK_LINE_MAX and not _DISCLAIMER_RE.search(text):
            return False
        if text.endswith((":", "：")) and not _DISCLAIMER_RE.search(text):
            return False
    return True


def _contact_block_start(body: list[str], first: int) -> int | None:
    """Trailing "Name / e-mail / phone / web" block after a blank line (a signature without
    delimiter); needs two contact lines so that a phone number in a note stays."""
    end = len(body)
    k = end - 1
    while k > first and not _is_blank(body[k]):
        k -= 1
    if k <= first:
        return None
    block = [line for line in body[k + 1:end] if line.strip()]
    if not 2 <= len(block) <= 6 or not _is_name_line(block[0].strip()):
        return None
    contacts = sum(1 for line in block[1:] if _is_contact_line(line))
    if contacts >= 2 and all(len(line.strip()) <= _SIGNOFF_TAIL_LINE_MAX for line in block):
        return k + 1
    return None


def _signature_start(body: list[str], first: int) -> int | None:
    # "-- " delimiter (RFC 3676 section 4.3) or an underscore rule (mailing-list footers).
    for k in range(first + 1, len(body)):
        if _SIG_DELIM_RE.match(body[k]):
            return k
        # A long dash rule followed by a short block with contact details.
        if _DASH_RULE_RE.match(body[k]):
            below = [line for line in body[k + 1:] if line.strip()]
            if (
                below
                and len(below) <= 15
                and all(len(line) <= 80 for line in below)
                and sum(1 for line in below if _is_contact_line(line)) >= 2
            ):
                return k
    nonblank = [k for k in range(first + 1, len(body)) if not _is_blank(body[k])]
    tail = nonblank[-_SIGNOFF_MAX_TAIL_LINES - 1:]
    # Mobile trailer near the end, with the bare name written just above it.
    for k in tail:
        if _is_mobile_trailer(body[k]):
            if k - 1 > first and _is_name_line(body[k - 1].strip()):
                return k - 1
            return k
    # Sign-off block: earliest closing phrase in the tail followed only by short lines.
    for pos, k in enumerate(tail):
        m = _SIGNOFF_RE.match(body[k])
        if not m:
            continue
        name = m.group("name")
        if name is not None and not name[0].isupper():
            continue
        after = tail[pos + 1:]
        if all(len(body[r].strip()) <= _SIGNOFF_TAIL_LINE_MAX for r in after) and not any(
            body[r].rstrip().endswith(("?", ":")) for r in after
        ):
            return k
    # A closing phrase ("Mit freundlichen Grüßen", "Z poważaniem", "С уважением") above a
    # long company signature: name, title, address, phones, register and legal lines.
    for k in nonblank[-_SIGBLOCK_MAX_LINES - 1:]:
        m = _SIGNOFF_RE.match(body[k])
        if not m or not _CLOSING_RE.match(body[k]):
            continue
        below = [body[r] for r in nonblank if r > k]
        if _signature_block(below):
            return k
    # "-Name" as the last line (GitHub's email_reply_parser signature rule).
    if nonblank and _DASH_NAME_RE.match(body[nonblank[-1]]):
        k = nonblank[-1]
        if body[k].strip()[1].isupper():
            return k
    return _contact_block_start(body, first)


# --- HTML ------------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "center", "dd", "div", "dl",
        "dt", "fieldset", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "html", "li", "main", "nav", "ol", "p", "pre", "section", "table",
        "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
    }
)
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
     "track", "wbr"}
)
_SKIP_TAGS = frozenset({"script", "style", "head", "title", "template"})
# Containers in which clients put the quoted message.
_QUOTE_CLASSES = ("gmail_quote", "yahoo_quoted", "moz-cite-prefix", "zmail_extra",
                  "protonmail_quote", "ms-outlook-mobile-reference-message", "tutanota_quote")
# Markers after which everything is the quoted message (Outlook desktop, web, Mac and the
# new Outlook; Zimbra's divider above its header block).
_CUT_IDS = ("divrplyfwdmsg", "appendonsend", "olk_src_body_section", "outlookmessageheader",
            "mail-editor-reference-message-container", "zwchr")
_WS_RE = re.compile(r"[ \t\n\r\f\v]+")


class _HtmlToLines(HTMLParser):
    """Renders HTML as (line, quoted) pairs; quote containers become quoted lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[str, bool]] = []
        self._cur: list[str] = []
        self._cur_quoted = False
        # open elements: (tag, is a quote container)
        self._stack: list[tuple[str, bool]] = []
        self._quote_depth = 0
        self._skip_depth = 0
        self._pre_depth = 0
        self._stopped = False

    # helpers
    def _flush(self) -> None:
        text = "".join(self._cur)
        if not self._pre_depth:
            text = text.strip(" \t\n\r\f\v")
        for part in text.split("\n"):
            self.lines.append((part, self._cur_quoted))
        self._cur = []

    def _newline(self) -> None:
        if self._cur:
            self._flush()
        elif self.lines and self.lines[-1][0] != "":
            self.lines.append(("", False))
        self._cur_quoted = self._quote_depth > 0

    def _is_quote_container(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag == "blockquote":
            return True
        classes = " ".join(v or "" for k, v in attrs if k == "class").lower()
        # GMX and web.de wrap the quoted message in <div name="quote">.
        named_quote = any(k == "name" and (v or "").lower() == "quote" for k, v in attrs)
        return named_quote or any(c in classes for c in _QUOTE_CLASSES)

    def _is_cut_marker(self, attrs: list[tuple[str, str | None]]) -> bool:
        for k, v in attrs:
            if k in ("id", "class") and v:
                low = v.lower()
                if any(c in low for c in _CUT_IDS):
                    return True
        return False

    # HTMLParser hooks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._stopped:
            return
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
            return
        if self._is_cut_marker(attrs):
            self._newline()
            self._stopped = True
            return
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self._newline()
            return
        quote = self._is_quote_container(tag, attrs)
        if tag in _BLOCK_TAGS or quote:
            self._newline()
        self._stack.append((tag, quote))
        if quote:
            self._quote_depth += 1
            self._cur_quoted = True
        if tag == "pre":
            self._pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS and tag not in _SKIP_TAGS and not self._stopped:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._stopped:
            return
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
            return
        if tag in _VOID_TAGS:
            return
        # pop to the matching open tag (tolerates unclosed children)
        for idx in range(len(self._stack) - 1, -1, -1):
            if self._stack[idx][0] == tag:
                for t, quote in self._stack[idx:]:
                    if quote:
                        if tag in _BLOCK_TAGS or quote:
                            self._newline()
                        self._quote_depth -= 1
                    if t == "pre":
                        self._pre_depth = max(0, self._pre_depth - 1)
                del self._stack[idx:]
                break
        if tag in _BLOCK_TAGS:
            self._newline()

    def handle_data(self, data: str) -> None:
        if self._stopped or self._skip_depth:
            return
        if not self._pre_depth:
            data = _WS_RE.sub(" ", data)
            if not self._cur and data == " ":
                return
        if not self._cur:
            self._cur_quoted = self._quote_depth > 0
        self._cur.append(data)

    def close(self) -> None:
        super().close()
        if self._cur:
            self._flush()


def _html_to_lines(html: str) -> tuple[list[str], list[bool]]:
    parser = _HtmlToLines()
    parser.feed(html)
    parser.close()
    lines = [t for t, _ in parser.lines]
    forced = [q and bool(t.strip()) for t, q in parser.lines]
    # A Gmail "quote" that begins with a forward separator is a forward, the sender's
    # content (talon keeps it); a forward further down a quote (after an attribution) is
    # part of the quoted history.
    run_start = True
    for k, line in enumerate(lines):
        if not forced[k]:
            run_start = run_start or bool(line.strip())
            continue
        if run_start and separator_kind(line.strip()) == "forward":
            for j in range(k, len(lines)):
                forced[j] = False
            break
        run_start = False
    return lines, forced


def html_to_reply(html: str) -> str:
    """:func:`extract_reply` for an HTML body (quote containers removed first)."""
    lines, forced = _html_to_lines(html)
    return _extract_lines(lines, forced)


# --- messages --------------------------------------------------------------------------------


def extract_reply_from_message(msg: EmailMessage) -> str:
    """Same as :func:`extract_reply`, from a message parsed with ``email.policy.default``.

    Prefers the text/plain body; falls back to text/html converted to text, with
    ``<blockquote>`` and the quote containers of Gmail, Outlook, Thunderbird and Yahoo removed.
    """
    body = msg.get_body(preferencelist=("plain",))
    if body is not None:
        return extract_reply(part_text(body))
    body = msg.get_body(preferencelist=("html",))
    if body is not None:
        return html_to_reply(part_text(body))
    return ""
