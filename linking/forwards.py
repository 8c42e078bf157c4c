"""Forwarded-message parsing: who really wrote the mail a salesperson forwarded to dealmail.

A user forwards a customer's mail to the company address with an empty To (docs/architecture.md,
Smart BCC). The outer message is from the user; the correspondent is inside, either

* attached whole: a ``message/rfc822`` part (RFC 2046 §5.2.1), or an ``.eml`` file sent
  as ``application/octet-stream`` — then the original's own headers are read;
* re-sent with ``Resent-*`` headers (RFC 5322 §3.6.6) — the message is the original;
* inline: the client pasted a header block ("From: … / Date: … / Subject: …") in the
  body, in the client's UI language, after a separator line ("---------- Forwarded
  message ---------", "Begin forwarded message:", "-----Original Message-----",
  "________________________________", …) or with no separator at all, possibly
  ">"-quoted, possibly nested (a forward of a forward).

How an inline forward is read, from the most explicit to the least:

1. a separator line (tables of phrases per client family and UI language below; on a
   dashed line a phrase may go on with a name: "----- Forwarded by Sam on … -----"), then
   the header block under it; a block whose labels are all unknown is read from what its
   values hold (first address = From, then To and Cc, a value with a date and time = Date,
   the rest = subject); when there is no block, an introduction line naming the sender
   ("26.11.2026, 10:03, "Name" <a@x>:", Yandex) or GroupWise's ">>> Name <a@x> date >>>";
2. a header block with no separator, at the start of a paragraph (or under a line that
   only dates it) with a sender and two of date, To and subject;
3. with a forward Subject ("Fwd:", "TR:", "WG:"…), an "On … wrote:" line above an indented
   or quoted original (Outlook for Mac).

A header block's fields may carry labels in any of the languages of _LABELS, fields with
unknown labels between them are skipped, wrapped values are joined. When the original's
From holds only a name (Outlook prints just the display name of an address-book contact),
``from_`` is None and ``from_raw``/``from_name`` keep the name, with ``from_name_only``
set, so that a caller can match it against known persons.

Everything here is a pure function of the message or text: no database, no network. The
tests in tests/linking measure it on public corpora and on held-out mail written from each
client's conventions (tests/linking/fixtures_heldout).
"""

from __future__ import annotations

import re
import textwrap
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

from dealmail.addresses import (
    AddressError,
    Mailbox,
    decode_words,
    normalize_address,
    parse_address_list,
    parse_strict_mailbox,
)
from linking.fwddates import parse_forward_date
from linking.htmltext import html_to_text
from linking.parse import part_text

__all__ = [
    "ForwardedMessage",
    "find_forwards",
    "has_forward_marker",
    "header_block_at",
    "parse_inline_forward",
    "separator_kind",
    "strip_subject_prefixes",
]


@dataclass
class ForwardedMessage:
    """One forwarded original, as far as the forward lets us see it."""

    from_: Mailbox | None
    to: list[Mailbox]
    cc: list[Mailbox]
    subject: str
    date: datetime | None
    date_raw: str
    date_flagged: bool
    body: str
    note: str
    source: str
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    raw: bytes | None = None
    # The From text as found; when it holds no address (Outlook prints only the display
    # name of an address-book contact: "From: Carl Other") it is that name, cleaned of
    # quotes, and ``from_`` is None: the caller may match the name against its persons.
    from_raw: str = ""
    from_name_only: bool = False

    @property
    def from_name(self) -> str:
        """The original sender's display name, also when no address was printed."""
        if self.from_ is not None:
            return self.from_.name
        return self.from_raw if self.from_name_only else ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.from_.as_dict() if self.from_ else None,
            "from_name": self.from_name,
            "to": [m.as_dict() for m in self.to],
            "cc": [m.as_dict() for m in self.cc],
            "subject": self.subject,
            "date": self.date.isoformat() if self.date else None,
            "body": self.body,
            "note": self.note,
            "source": self.source,
            "message_id": self.message_id,
        }


# ---------------------------------------------------------------------------------------
# Vocabulary. Everything is compared after _fold (case-folded, accents stripped).

# Separator phrases that say "this is a forward" in so many words, compared after
# _phrase_key (case, accents, hyphens and apostrophes ignored). Sources: the strings each
# client writes in its UI languages: Gmail (one English line in every locale), Apple Mail
# and iOS ("Begin forwarded message:" translated), Thunderbird and Yahoo ("-------- Forwarded
# Message --------" translated), Zimbra, Mail.ru, Yandex, QQ Mail, Daum, ProtonMail, Zoho.
_FORWARD_PHRASES = (
    # English (Gmail, Thunderbird, Yahoo, Apple, MailMate, HubSpot, Spark, Missive, IONOS,
    # ProtonMail, Zoho, Zimbra)
    "forwarded message", "begin forwarded message", "forwarded email", "forwarded e-mail",
    "forwarded mail", "fwd message", "forwarded message follows", "original forwarded message",
    # French
    "message transfere", "debut du message reexpedie", "debut du message transfere",
    "courriel transfere", "message reexpedie", "e-mail transfere", "mail transfere",
    "message transmis",
    # German
    "weitergeleitete nachricht", "anfang der weitergeleiteten nachricht",
    "anfang der weitergeleiteten e-mail", "weitergeleitete e-mail", "weitergeleitete mail",
    # Spanish / Catalan / Portuguese / Italian
    "mensaje reenviado", "inicio del mensaje reenviado", "correo reenviado",
    "comienzo del mensaje reenviado", "missatge reenviat", "inici del missatge reenviat",
    "mensagem encaminhada", "inicio da mensagem encaminhada", "mensagem reencaminhada",
    "inicio da mensagem reencaminhada", "messaggio inoltrato", "inizio messaggio inoltrato",
    # Dutch / Scandinavian / Finnish / Estonian
    "doorgestuurd bericht", "begin doorgestuurd bericht", "doorgestuurde e-mail",
    "doorgestuurd bericht begint",
    "vidarebefordrat meddelande", "vidarebefordrat brev", "borjan pa vidarebefordrat brev",
    "vidarebefordrat mejl", "vidarebefordrat e-postmeddelande",
    "videresendt melding", "start pa videresendt melding", "videresendt e-post",
    "videresendt meddelelse", "videresendt besked", "start pa videresendt besked",
    "valitetty viesti", "valitetty viesti / fwd.msg", "edelleenlahetetty viesti",
    "valitetty viesti alkaa", "edastatud kiri", "edastatud sonum", "edasisaadetud kiri",
    # Polish / Czech / Slovak / Hungarian / Romanian / Croatian / Slovenian / Serbian /
    # Lithuanian / Latvian
    "Wiadomość przekazana dalej", "Przekazana wiadomość", "Początek przekazywanej wiadomości",
    "Przesłana wiadomość", "Wiadomość przesłana dalej", "Treść przekazanej wiadomości",
    "preposlana zprava", "preposlana sprava", "zacatek preposilane zpravy",
    "zacatek preposlane zpravy", "zaciatok preposlanej spravy",
    "tovabbitott uzenet", "tovabbitott level kezdete", "tovabbitott level",
    "mesaj redirectionat", "inceputul mesajului redirectionat", "mesaj transmis",
    "incepe mesajul redirectionat", "Proslijeđena poruka", "Početak proslijeđene poruke",
    "Započni proslijeđenu poruku", "Posredovano sporočilo", "Prosleđena poruka",
    "persiųstas laiškas", "pārsūtīta ziņa", "pārsūtītā vēstule",
    # Russian / Ukrainian / Bulgarian / Turkish / Greek
    "пересылаемое сообщение", "пересланное сообщение", "начало переадресованного сообщения",
    "переадресованное сообщение", "перенаправленное сообщение", "пересланный лист",
    "пересланий лист", "початок пересланого листа", "переслане повідомлення",
    "перенаправлене повідомлення", "початок листа, що пересилається",
    "препратено съобщение", "препратено писмо",
    "iletilen ileti", "ileti baslangıcı", "iletilmis ileti", "yonlendirilen ileti",
    "ileti baslangici", "iletilmis mesaj",
    "προωθημενο μηνυμα", "έναρξη προωθημένου μηνύματος",
    # Japanese / Chinese / Korean / Vietnamese / Indonesian / Hebrew / Arabic
    "転送されたメッセージ", "転送メッセージ", "メッセージを転送", "転送メール", "转发的邮件",
    "转发的消息", "转发邮件", "轉寄的郵件", "轉寄的郵件開始", "已转发邮件",
    "전달된 메시지", "전달된 메일", "tin nhắn đã chuyển tiếp", "pesan yang diteruskan",
    "bắt đầu tin nhắn được chuyển tiếp", "awal pesan yang diteruskan",
    "permulaan mesej dimajukan", "เริ่มข้อความที่ส่งต่อ", "הודעה שהועברה",
    "תחילת הודעה מועברת", "رسالة معاد توجيهها", "بداية الرسالة المعاد توجيهها",
)
# A separator line that *begins* with one of these names the forwarder or the original
# sender after it: mutt's "----- Forwarded message from Bob <b@x> -----", Lotus Notes'
# "----- Forwarded by Sam Carter/ACME on 26.11.2026 10:15 -----" and its translations.
_FORWARD_PREFIXES = (
    "forwarded message from", "forwarded by", "weitergeleitet von", "transfere par",
    "reenviado por", "inoltrato da", "doorgestuurd door", "vidarebefordrat av",
    "przekazane przez", "переслано",
)
# The line some webmails write under the forwarded text (Yandex, mutt): not the original's.
_END_PHRASES = (
    "end of forwarded message", "end forwarded message", "end of forwarded e-mail",
    "конец пересылаемого сообщения", "кінець пересланого повідомлення",
    "ende der weitergeleiteten nachricht", "fin du message transfere",
    "fin del mensaje reenviado", "fine messaggio inoltrato", "original message ends",
    "end of original message", "ende der ursprunglichen nachricht",
)

# Separators that Outlook and others use for replies *and* forwards: they only count when
# a header block with a From follows, and not when the outer Subject says it is a reply.
_GENERIC_PHRASES = (
    "original message", "original e-mail", "original", "message d'origine", "message original",
    "mail original", "ursprungliche nachricht", "ursprungliche mail", "originalnachricht",
    "original-nachricht", "mensaje original", "mensagem original", "missatge original",
    "messaggio originale", "oorspronkelijk bericht", "origineel bericht",
    "ursprungligt meddelande", "opprinnelig melding", "oprindelig meddelelse",
    "alkuperainen viesti", "Oryginalna wiadomość", "Wiadomość oryginalna", "puvodni zprava",
    "puvodni e-mail", "povodna sprava", "povodny e-mail", "eredeti uzenet", "mesaj original",
    "izvorna poruka", "izvorno sporočilo", "originalna poruka", "pradinis laiškas",
    "sākotnējā ziņa", "algne kiri",
    "исходное сообщение", "оригинальное сообщение", "исходное письмо", "вихідний лист",
    "оригінальне повідомлення", "оригинално съобщение", "orijinal mesaj", "orijinal ileti",
    "αρχικο μηνυμα", "元のメッセージ", "原始邮件", "原始郵件", "원본 메시지", "원본 메일",
    "tin nhắn gốc", "pesan asli", "הודעה מקורית", "الرسالة الأصلية", "reply message",
    "antwort nachricht",
)

# Header labels per field, in the UI languages of Outlook (desktop, web, Mac, mobile),
# Gmail, Apple Mail, Thunderbird, Yahoo, Roundcube, Zimbra, Mail.ru, QQ Mail, Naver, Daum,
# Lotus Notes, Libero, Seznam. Compared after _label_key (spaces and a trailing dot
# ignored, so "보낸사람" == "보낸 사람" and "Κοιν." == "Κοιν").
_LABELS: dict[str, tuple[str, ...]] = {
    "from": (
        "From", "Von", "De", "Da", "Van", "Från", "Fra", "Lähettäjä", "Od", "Feladó", "Kimden",
        "Gönderen", "От", "От кого", "Отправитель", "Від", "Від кого", "Saatja", "差出人",
        "送信者", "送信元", "发件人", "發件人", "寄件者", "寄件人", "Mittente", "Šalje",
        "De la", "Sender", "Absender", "Afsender", "Avsender", "Avsändare", "Nadawca",
        "Odesílatel", "Odosielateľ", "보낸 사람", "보낸이", "Από", "Expéditeur", "Remitente",
        "Remetente", "Afzender", "Pošiljatelj", "Pošiljalac", "Pošiljatelj", "Expeditor",
        "Expeditorul", "Nuo", "Siuntėjas", "No", "Sūtītājs", "Từ", "Dari", "Pengirim",
        "מאת", "من", "จาก", "Lähettäjä", "Remitent", "Daripada", "Од", "Frá", "Oddi wrth",
        "Nork", "Nga", "Кімнен", "प्रेषक", "از", "فرستنده", "Mula kay", "Kutoka", "Kimdən",
        "Kimdan",
    ),
    "date": (
        "Date", "Sent", "Datum", "Dato", "Gesendet", "Envoyé", "Envoyé le", "Enviado",
        "Enviada", "Enviado el", "Enviada em", "Enviado em", "Enviat", "Enviat el", "Inviato",
        "Data", "Verzonden", "Skickat", "Sendt", "Lähetetty", "Päiväys", "Päivämäärä",
        "Wysłano", "Wysłany", "Wysłane", "Odesláno", "Odoslané", "Elküldve", "Küldve",
        "Dátum", "Dată", "Trimis", "Poslano", "Poslato", "Отправлено", "Дата",
        "Дата отправки", "Надіслано", "Відправлено", "Изпратено", "Tarih", "Gönderildi",
        "Gönderilme tarihi", "Gönderilen", "Saadetud", "Kuupäev", "送信日時", "日付", "開始日時",
        "日時", "发送时间", "發送時間", "日期", "時間", "寄件日期", "傳送時間", "Fecha", "Sent at",
        "Kdy", "Ημερομηνία", "Στάλθηκε", "Lähetysaika", "보낸 날짜", "날짜", "Išsiųsta",
        "Nosūtīts", "Đã gửi", "Ngày", "Dikirim", "Tanggal", "נשלח", "تاريخ", "تم الإرسال",
        "ส่ง", "วันที่", "Dihantar", "Tarikh", "Послато", "Испратено", "Enviados", "Anfonwyd",
        "Bidalia", "Dërguar", "Жіберілді", "भेजा गया", "ارسال شده", "تاریخ", "Ipinadala",
        "Imetumwa", "Gestuur", "Göndərilib", "Yuborildi",
    ),
    "to": (
        "To", "An", "À", "A", "Para", "Per a", "送信先", "Aan", "Till", "Til", "Vastaanottaja",
        "Do", "До", "Komu", "Címzett", "Către", "Catre", "Prima", "Кому", "Kime", "Alıcı",
        "Saaja", "Adressaat", "宛先", "收件人", "收件者", "Pour", "Destinatario",
        "Destinatário", "Destinataire", "Destinatarul", "Empfänger", "Pre", "Adresát",
        "Adresat", "Příjemce", "Mottaker", "Modtager", "Mottagare", "Ontvanger", "Προς",
        "받는 사람", "Prejemnik", "Primalac", "Za", "Kam", "Đến", "Kepada", "אל", "إلى",
        "ถึง", "За", "At", "Nori", "Për", "Кімге", "प्रति", "به", "گیرنده", "Para kay", "Kwa",
        "Kimə", "Kimga",
    ),
    "cc": (
        "Cc", "CC", "Kopie", "Kopie (CC)", "Kopia", "Kopi", "Kopio", "DW", "Копия", "Копія",
        "Копие", "Másolat", "Másolatot kap", "Bilgi", "Koopia", "Kópia", "Kopija", "副本",
        "抄送", "Cópia", "Copia", "Copie", "Copie à", "Kopie an", "Kopia do", "Kopiera",
        "Κοιν", "참조", "A/c", "Kp", "עותק", "نسخة", "สำเนา", "Tembusan", "Sk", "Копија",
        "Afrit", "Cc", "Көшірме", "प्रतिलिपि", "رونوشت", "Nakala", "Surət", "Nusxa",
    ),
    "bcc": ("Bcc", "Cci", "Ukryta kopia", "Skrytá kopie", "Скрытая копия", "Bkopi", "Bcc"),
    "subject": (
        "Subject", "Betreff", "Objet", "Asunto", "Assumpte", "Oggetto", "Ogg", "Assunto",
        "Onderwerp", "Ämne", "Emne", "Aihe", "Temat", "Předmět", "Predmet", "Tárgy",
        "Subiect", "Subiectul", "Naslov", "Zadeva", "Тема", "Konu", "Teema", "Tema", "Tēma",
        "件名", "主题", "主旨", "標題", "Sujet", "Θέμα", "제목", "Chủ đề", "Perihal", "Subjek",
        "נושא", "الموضوع", "เรื่อง", "Perkara", "Efni", "Pwnc", "Gaia", "Subjekti",
        "Тақырып", "विषय", "موضوع", "Paksa", "Mada", "Mövzu", "Mavzu",
    ),
    "reply-to": (
        "Reply-To", "Répondre à", "Antwort an", "Responder a", "Rispondi a", "Antwoord aan",
        "Svara till", "Svar til", "Odpowiedź do", "Odpowiedź-do", "Ответить", "Ответ-Кому",
        "返信先", "Odgovori na", "Odpověď na", "Vastaus", "Válaszcím", "Răspuns către",
        "Odpovedať-Pre", "Yanıt Adresi", "Кому відповісти",
    ),
    # Lines some clients put into the block that say nothing about who wrote to whom.
    "other": (
        "Importance", "Wichtigkeit", "Priorität", "Priorité", "Importancia", "Prioridad",
        "Importanza", "Priorità", "Prioriteit", "Priority", "Attachments", "Anlagen",
        "Pièces jointes", "Adjuntos", "Allegati", "Bijlagen", "Załączniki", "Вложения",
        "Organization", "Organisation", "Message-ID", "Tags", "Kategorien", "Categories",
    ),
}

_LABEL_LIMIT = 40


def _fold(text: str) -> str:
    """Case-fold, strip accents, collapse white space (so 'Début' == 'debut')."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.split())


def _phrase_key(text: str) -> str:
    """A separator phrase as compared: folded, hyphens and apostrophes as spaces, so that
    "Original-Nachricht", "Original Nachricht" and "Původní e-mail" match their entries."""
    return " ".join(re.sub(r"[-_'’`]", " ", _fold(text)).split())


def _label_key(text: str) -> str:
    """A header label as compared: folded, no spaces, no trailing dot ("Κοιν." == "Κοιν",
    "보낸사람" == "보낸 사람", "Copie à" == "Copie  à")."""
    return _fold(text).replace(" ", "").rstrip(".")


_FOLDED_FORWARD = frozenset(_phrase_key(p) for p in _FORWARD_PHRASES)
_FOLDED_GENERIC = frozenset(_phrase_key(p) for p in _GENERIC_PHRASES)
_FOLDED_PREFIXES = tuple(_phrase_key(p) for p in _FORWARD_PREFIXES)
_FOLDED_END = frozenset(_phrase_key(p) for p in _END_PHRASES)
_FOLDED_LABELS: dict[str, str] = {
    _label_key(label): fieldname for fieldname, labels in _LABELS.items() for label in labels
}

# A header line: optional bold markers, a label, a colon (ASCII or full-width, with the
# French space before it), the value.
_HEADER_RE = re.compile(
    r"^[ \t]*\*{0,2}[ \t]*(?P<label>[^:：\n*]{1,"
    + str(_LABEL_LIMIT)
    + r"}?)[ \t]*\*{0,2}[ \t]*[:：]\*{0,2}[ \t]*(?P<value>.*)$"
)
# Yahoo puts the whole header block on the separator line with no line breaks:
# "----- Forwarded Message ----- From: a <a@x>To: b <b@y>Sent: …Subject: …".
_DASHED_RE = re.compile(
    r"^[ \t]*[-=]{2,}[ \t]*(?P<phrase>[^-=].*?)[ \t]*[-=]{2,}[ \t]*(?P<rest>.*)$"
)
_GLUED_LABEL_RE = re.compile(
    "(?P<label>"
    + "|".join(
        re.escape(label)
        for label in sorted(
            {lab for labels in _LABELS.values() for lab in labels}, key=len, reverse=True
        )
    )
    + r")[ \t]*[:：]",
    re.IGNORECASE,
)
_QUOTE_RE = re.compile(r"^((?:[ \t]{0,3}>)+)[ \t]?")
_RULE_RE = re.compile(r"^[ \t]*(?:_{8,}|-{8,}|={8,})[ \t]*$")
_FRAME_RULE_RE = re.compile(r"^[ \t]*(?:-{4,}|={4,}|_{4,})[ \t]*$")
# Any "Label: value" line (see _label_line); the label starts with a letter and holds no
# digit, '@', '<' or '>', so "Re: 10:30" and "a@b.example: x" are not labels.
_LABEL_LINE_RE = re.compile(
    r"^[ \t]*\*{0,2}[ \t]*(?P<label>[^\W\d_][^:：\n*<>@\d]{0,28}?)[ \t]*\*{0,2}[ \t]*[:：]"
    r"(?:[ \t]+|$)(?P<value>.*)$"
)
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-\u0080-\uffff]+"
    r"@[A-Za-z0-9\-\u0080-\uffff]+(?:\.[A-Za-z0-9\-\u0080-\uffff]+)+"
)

# Subject prefixes. Forward: en Fwd/Fw, fr TR, de WG, fi VL, pl PD, es RV/Reenviado,
# it I, pt Enc, nl Doorst, sv VB, tr İlt, da/no VS, ru Пересл, ja 転送, zh 转发.
_FWD_PREFIX_RE = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:fwd?|fw|tr|wg|vl|pd|rv|reenviado|i|enc|doorst|vb|vs|"
    r"ilt|İlt|пересл|fwd\.|転送|转发|轉寄|wtrp|továbbítás|továbbítva|ynt)\s*(?:\[\d+\])?\s*[:：]",
    re.IGNORECASE,
)
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:\[[^\]]{0,40}\]\s*)?(?:re|aw|sv|antw|odp|odg|rif|r|réf|ref|vá|ynt|atb|res|"
    r"отв|ответ|回复|回覆|答复|返信)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]",
    re.IGNORECASE,
)
_ANY_PREFIX_RE = re.compile(
    r"^\s*(?:(?:fwd?|fw|tr|wg|vl|pd|rv|reenviado|i|enc|doorst|vb|vs|ilt|İlt|пересл|転送|转发|"
    r"轉寄|re|aw|sv|antw|odp|odg|rif|r|réf|ref|vá|ynt|atb|res|отв|ответ|回复|回覆|答复|返信)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)
_ON_BEHALF_RE = re.compile(
    r"\s+(?:on behalf of|im auftrag von|de la part de|en nombre de|per conto di|"
    r"em nome de|namens|för|på vegne af|på vegne av|w imieniu|jménem|от имени)\s+.*$",
    re.IGNORECASE,
)
_DATE_IN_LINE_RE = re.compile(
    r"\d{1,4}[/.\-]\d{1,2}[/.\-]\d{2,4}(?:,?\s*(?:at\s+)?\d{1,2}[:.]\d{2}(?:[:.]\d{2})?"
    r"(?:\s*[AaPp]\.?[Mm]\.?)?)?"
)
_MAX_CHAIN = 20
# Characters with no glyph that clients put around names, addresses and whole RTL lines
# (byte order mark, zero-width space, the bidirectional marks, embeddings and isolates of
# Unicode's bidi algorithm (UAX #9), word joiner).
_INVISIBLE_RE = re.compile("[\ufeff\u200b\u200e\u200f\u061c\u202a-\u202e\u2060\u2066-\u2069]")
# GroupWise's quote marker: ">>> Dana Lee <dana@x> 11/26/2026 10:03 AM >>>" and the original
# below it, unquoted.
_GROUPWISE_RE = re.compile(r"^[ \t]*>>>[ \t]+(?P<info>[^\n]{3,300}?)[ \t]+>>>[ \t]*$")
_CLOCK_RE = re.compile(r"(?<!\d)\d{1,2}\s?[:.h時]\s?\d{2}(?!\d)")


def strip_subject_prefixes(subject: str) -> str:
    """'FW: Re: Offer' -> 'Offer' (forward and reply prefixes in common languages)."""
    return _ANY_PREFIX_RE.sub("", subject or "").strip()


def _subject_kind(subject: str | None) -> str:
    """'forward', 'reply', 'plain' or 'unknown' (no Subject known)."""
    if subject is None:
        return "unknown"
    if _FWD_PREFIX_RE.match(subject):
        return "forward"
    if _REPLY_PREFIX_RE.match(subject):
        return "reply"
    return "plain"


# ---------------------------------------------------------------------------------------
# Text helpers


def _prepare(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE_RE.sub("", text)
    return text.replace("\u00a0", " ").split("\n")


def _depth(line: str) -> tuple[int, str]:
    """Quote depth (number of '>' markers, RFC 3676 §4.5) and the unquoted content."""
    m = _QUOTE_RE.match(line)
    if not m:
        return 0, line
    return m.group(1).count(">"), line[m.end():]


def _dequote(line: str, levels: int) -> str:
    """``line`` without its first ``levels`` quote markers (each: up to three blanks, '>',
    one optional blank), walked by index so that a deeply quoted line costs linear time."""
    pos, n = 0, len(line)
    for _ in range(levels):
        j = pos
        while j < n and j - pos < 3 and line[j] in " \t":
            j += 1
        if j >= n or line[j] != ">":
            break
        j += 1
        if j < n and line[j] in " \t":
            j += 1
        pos = j
    return line[pos:]


def _phrase_kind(phrase: str, dashed: bool) -> str | None:
    """'forward' or 'generic' for a separator phrase, else None. On a dashed line a phrase
    may go on with a name ("Forwarded message from Bob <b@x>", "Forwarded by Sam on …")."""
    key = _phrase_key(phrase.strip(" :：*"))
    if key in _FOLDED_FORWARD:
        return "forward"
    if key in _FOLDED_GENERIC:
        return "generic"
    if dashed and key.startswith(_FOLDED_PREFIXES):
        return "forward"
    return None


def _separator(content: str) -> tuple[str, str] | None:
    """('forward'|'generic', rest-of-line) when ``content`` is a separator line."""
    stripped = content.strip()
    if not stripped or len(stripped) > 120:
        return None
    if _RULE_RE.match(stripped):
        return "generic", ""
    m = _DASHED_RE.match(stripped)
    if m:
        kind = _phrase_kind(m.group("phrase"), dashed=True)
        if kind:
            return kind, m.group("rest")
    kind = _phrase_kind(stripped.strip("-_=*•~# \t").rstrip(":：").strip(), dashed=False)
    if kind:
        return kind, ""
    return None


def _is_end_marker(content: str) -> bool:
    """"-------- End of forwarded message --------" and its translations."""
    stripped = content.strip()
    if len(stripped) > 120 or not stripped.startswith(("-", "=", "_")):
        return False
    return _phrase_key(stripped.strip("-_=* \t")) in _FOLDED_END


def _separator_long(content: str) -> tuple[str, str] | None:
    """Like _separator but allows Yahoo's long one-line header block after the phrase."""
    m = _DASHED_RE.match(content.strip())
    if m and m.group("rest"):
        kind = _phrase_kind(m.group("phrase"), dashed=True)
        if kind:
            return kind, m.group("rest")
    return _separator(content)


def _header(content: str) -> tuple[str, str] | None:
    """(field, value) when ``content`` is a header line with a known label."""
    if ":" not in content and "：" not in content:
        return None
    m = _HEADER_RE.match(content)
    if not m:
        return None
    fieldname = _FOLDED_LABELS.get(_label_key(m.group("label")))
    if fieldname is None:
        return None
    value = m.group("value").strip()
    if value.startswith("*") and value.endswith("*") and not value.startswith("**"):
        value = value.strip("*").strip()  # "*From:* *Dana*" - a bold value, not a name
    return fieldname, value


def _glued_headers(text: str) -> dict[str, str]:
    """Split Yahoo's 'From: a <a@x>To: b <b@y>Subject: s' into fields."""
    cuts: list[tuple[int, int, str]] = []
    for m in _GLUED_LABEL_RE.finditer(text):
        start = m.start()
        prev = text[start - 1] if start else " "
        label = m.group("label")
        if prev.isalpha() and not label[0].isupper():
            continue
        fieldname = _FOLDED_LABELS.get(_label_key(label))
        if fieldname is None:
            continue
        cuts.append((start, m.end(), fieldname))
    # Overlapping matches (a shorter label inside a longer one) keep the first.
    fields: dict[str, str] = {}
    kept: list[tuple[int, int, str]] = []
    for cut in cuts:
        if kept and cut[0] < kept[-1][1]:
            continue
        kept.append(cut)
    for i, (_start, end, fieldname) in enumerate(kept):
        stop = kept[i + 1][0] if i + 1 < len(kept) else len(text)
        if fieldname not in fields:
            fields[fieldname] = text[end:stop].strip()
    return fields


@dataclass
class _Block:
    fields: dict[str, str]
    end: int  # index of the first line after the header block


def _label_line(content: str) -> tuple[str, str] | None:
    """(label, value) for a line shaped like a header field whatever its label: one to
    three words without digits or address characters, a colon, the value."""
    m = _LABEL_LINE_RE.match(content)
    if not m or len(m.group("label").split()) > 3:
        return None
    return m.group("label").strip(), m.group("value").strip()


def _header_block(lines: list[str], start: int) -> _Block | None:
    """Read a block of header lines beginning at ``lines[start]`` (blank lines before it
    are skipped). Wrapped values are joined; blank lines between headers (Outlook's
    "-----Original Message-----" sometimes has them, Foxmail puts one before Subject) are
    tolerated; a field with a label we do not know, between known ones, is skipped (so it
    neither ends the block nor is glued to the previous value)."""
    n = len(lines)
    i = start
    while i < n and not lines[i].strip():
        i += 1
    fields: dict[str, str] = {}
    last: str | None = None

    def known_follows(k: int) -> bool:
        for j in range(k, min(k + 4, n)):
            if not lines[j].strip():
                return False
            if _header(lines[j]):
                return True
        return False

    while i < n:
        line = lines[i]
        if not line.strip():
            k = i
            while k < n and not lines[k].strip():
                k += 1
            nxt = _header(lines[k]) if k < n else None
            if fields and nxt and nxt[0] not in fields and k - i <= 3:
                i = k
                continue
            break
        hdr = _header(line)
        if hdr:
            name, value = hdr
            if name == "other":
                last = None
                i += 1
                continue
            if name in fields and name != "date":
                break  # a second From: is the next message's header block
            if name == "date" and "date" in fields:
                i += 1
                continue
            fields[name] = value
            last = name
            i += 1
            continue
        if fields and _label_line(line) and known_follows(i + 1):
            last = None
            i += 1
            continue
        # Not a header: a wrapped continuation of the previous value only when another
        # header line follows before the block's end, or it is more To/Cc addresses.
        if last is None:
            break
        addressy = last in ("from", "to", "cc") and "@" in line and _continues_list(
            fields[last], line
        )
        if known_follows(i + 1) or addressy:
            fields[last] = (fields[last] + " " + line.strip()).strip()
            i += 1
            continue
        break
    if not fields:
        return None
    return _Block(fields, i)


def _continues_list(value: str, line: str) -> bool:
    """Whether ``line`` carries on an address list wrapped after ``value``: the value ends
    with a separator, or its last entry is a name still waiting for its "<address>"."""
    if value.rstrip().endswith((",", ";")):
        return True
    last_entry = re.split(r"[,;]", value)[-1]
    return "@" not in last_entry and line.lstrip().startswith(("<", "[", "("))


def _inferred_block(lines: list[str], start: int) -> _Block | None:
    """A header block in a language whose labels we do not know: three or more
    consecutive "Label: value" lines, one value holding an address and one a date. Each
    client prints From before To (Outlook, Gmail, Apple Mail, Thunderbird), so the first
    address-bearing field is the sender, the next ones To and Cc; the remaining field that
    is neither an address nor a date is the subject."""
    n = len(lines)
    i = start
    while i < n and not lines[i].strip():
        i += 1
    pairs: list[tuple[str, str]] = []
    while i < n and len(pairs) < 12:
        pair = _label_line(lines[i])
        if pair is None:
            break
        pairs.append(pair)
        i += 1
    if len(pairs) < 3:
        return None
    with_address = [k for k, (_l, v) in enumerate(pairs) if _EMAIL_RE.search(v)]
    # Clients print the original's date with its time ("26.11.2026 10:03"); a date alone
    # ("When: 5 May 2026") is more likely a note's own field.
    dated = [
        k for k, (_l, v) in enumerate(pairs)
        if k not in with_address and _CLOCK_RE.search(v) and parse_forward_date(v, UTC)
    ]
    if not with_address or not dated:
        return None
    fields = {"from": pairs[with_address[0]][1], "date": pairs[dated[0]][1]}
    for name, k in zip(("to", "cc"), with_address[1:], strict=False):
        fields[name] = pairs[k][1]
    rest = [k for k in range(len(pairs)) if k not in with_address and k != dated[0]]
    if rest:
        fields["subject"] = pairs[rest[0]][1]
    return _Block(fields, i)


# ---------------------------------------------------------------------------------------
# Addresses as mail clients print them


def _clean_mailto(value: str) -> str:
    # "a@x<mailto:a@x>" (Outlook's plain-text rendering of a link): drop the decoration.
    value = re.sub(r"(?<=[^\s<(\[])<mailto:[^>]*>", "", value, flags=re.IGNORECASE)
    value = re.sub(r"(?<=[^\s<(\[])\[mailto:[^\]]*\]", "", value, flags=re.IGNORECASE)
    # "John <mailto:john@x>" and Outlook 2013's "John [mailto:john@x]".
    value = re.sub(r"[<\[]\s*mailto:([^>\]]*)[>\]]", r"<\1>", value, flags=re.IGNORECASE)
    value = re.sub(r"(?<![\w.])mailto:", "", value, flags=re.IGNORECASE)
    # "Foo Bar (foo@bar.example)" and "Name (<a@x>)".
    value = re.sub(r"\(\s*<?\s*([^()<>\s]+@[^()<>\s]+?)\s*>?\s*\)", r"<\1>", value)
    return value


def _split_list(value: str) -> list[str]:
    """Split an address list on ';' (Outlook's separator, never part of a name) and on ','
    once the current entry holds an address, so "'Bessie, Berry' <b@x>" and
    "Doe, John <j@x>" stay whole while "Sam Carter; sam@x" gives two entries."""
    out: list[str] = []
    cur: list[str] = []
    in_quote = False
    in_angle = False
    for ch in value:
        if ch == '"':
            in_quote = not in_quote
        elif ch == "<" and not in_quote:
            in_angle = True
        elif ch == ">" and not in_quote:
            in_angle = False
        if ch in ",;" and not in_quote and not in_angle:
            chunk = "".join(cur)
            if "@" in chunk or ch == ";":
                out.append(chunk)
                cur = []
                continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return [c.strip() for c in out if c.strip()]


# Quote marks around a display name, and the "*bold*" that a client's HTML-to-text
# conversion leaves around it (Gmail's text part: "From: *Dana Lee* <dana@x>").
_NAME_WRAPPERS = (('"', '"'), ("'", "'"), ("«", "»"), ("“", "”"), ("„", "“"), ("*", "*"))


def _unquote_name(name: str) -> str:
    name = name.strip().strip(",;").strip()
    changed = True
    while changed:
        changed = False
        for left, right in _NAME_WRAPPERS:
            if len(name) >= 2 and name.startswith(left) and name.endswith(right):
                name = name[1:-1].strip()
                changed = True
    return name.replace('\\"', '"')


def _mailbox(chunk: str) -> Mailbox | None:
    chunk = chunk.strip()
    m = re.search(r"<\s*([^<>]*@[^<>]*?)\s*>", chunk)
    if m:
        address = m.group(1)
        name = _unquote_name(chunk[: m.start()])
    else:
        em = _EMAIL_RE.search(chunk)
        if not em:
            return None
        address = em.group(0)
        name = _unquote_name((chunk[: em.start()] + chunk[em.end():]).strip(" <>()"))
    address = address.strip().strip("'\"")
    try:
        norm = normalize_address(address)
    except AddressError:
        return None
    name = decode_words(name)
    if _fold(name) == _fold(address) or _fold(name) == norm:
        name = ""
    return Mailbox(norm, name)


def _mailbox_list(value: str) -> list[Mailbox]:
    out: list[Mailbox] = []
    seen: set[str] = set()
    for chunk in _split_list(_clean_mailto(value)):
        mb = _mailbox(_ON_BEHALF_RE.sub("", chunk))
        if mb and mb.address not in seen:
            seen.add(mb.address)
            out.append(mb)
    return out


def _from_value(value: str) -> Mailbox | None:
    cleaned = _ON_BEHALF_RE.sub("", _clean_mailto(value)).strip()
    boxes = _mailbox_list(cleaned)
    return boxes[0] if boxes else None


# ---------------------------------------------------------------------------------------
# Inline parsing


def _display_name(value: str) -> str:
    """The name in a From value that holds no address (Outlook prints only the display
    name of an address-book contact): quotes, mailto decorations and a Lotus Notes
    hierarchy ("Carl Other/ACME@ACME") removed."""
    name = _ON_BEHALF_RE.sub("", _clean_mailto(value))
    # Brackets that hold no address: empty ones, or Exchange's internal X.500 name
    # ("Carl Other </O=ACME/OU=EXCHANGE ADMINISTRATIVE GROUP/CN=RECIPIENTS/CN=COTHER>").
    name = re.sub(r"<[^<>@]*>|\[[^\[\]@]*\]|\(\s*\)", "", name)
    name = re.sub(r"(?<=\S)/[^\s/@]+(?:/[^\s/@]+)*(?:@\S+)?$", "", name.strip())
    return decode_words(_unquote_name(name.strip(" ;,")))


def _make(
    fields: dict[str, str],
    body: str,
    note: str,
    default_tz: tzinfo,
    subject_fallback: str = "",
) -> ForwardedMessage:
    from_raw = fields.get("from", "").strip()
    date_raw = fields.get("date", "").strip()
    date = parse_forward_date(date_raw, default_tz) if date_raw else None
    from_ = _from_value(from_raw) if from_raw else None
    name_only = from_ is None and bool(from_raw)
    if name_only:
        # Keep the name for the caller to match against known persons.
        from_raw = _display_name(from_raw)
    return ForwardedMessage(
        from_=from_,
        to=_mailbox_list(fields.get("to", "")),
        cc=_mailbox_list(fields.get("cc", "")),
        subject=fields.get("subject", subject_fallback).strip(),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=body,
        note=note,
        source="inline",
        from_raw=from_raw,
        from_name_only=name_only and bool(from_raw),
    )


def _region(lines: list[str], start: int, depth: int) -> list[str]:
    """Lines from ``start`` that belong to a quote at ``depth`` (all of them at depth 0),
    with that many '>' removed. A non-quoted line right after a quoted one is a lazily
    wrapped continuation (MailMate does this); an empty unquoted line ends the quote."""
    if depth == 0:
        return lines[start:]
    out: list[str] = []
    prev_in = True
    for line in lines[start:]:
        d, _content = _depth(line)
        if d >= depth:
            out.append(_dequote(line, depth))
            prev_in = bool(_content.strip())
            continue
        if line.strip() and prev_in and d == depth - 1 and out:
            out.append(_dequote(line, d))
            continue
        break
    return out


def _join(lines: list[str]) -> str:
    return "\n".join(lines).strip()


def _note(lines: list[str], end: int) -> str:
    note_lines = lines[:end]
    # A quoted separator ("> Begin forwarded message:") leaves ">" lines above it.
    while note_lines and _depth(note_lines[-1])[0] and not _depth(note_lines[-1])[1].strip():
        note_lines.pop()
    return _join(note_lines)


def _body(region: list[str], start: int, opener: str = "") -> str:
    """The original's text: the lines after its header block, without a copy of the
    separator that Zoho repeats under the header block, and without an end marker
    ("-------- End of forwarded message --------", Yandex and mutt) at the end."""
    lines = region[start:]
    k = 0
    while k < len(lines) and not lines[k].strip():
        k += 1
    if opener and k < len(lines) and _phrase_key(lines[k].strip("-=_* \t")) == opener:
        rest = _header_block(lines, k + 1)
        if rest is None or "from" not in rest.fields:
            lines = lines[k + 1:]
    # A rule under the header block (SquirrelMail, Sylpheed) and rules or an end marker
    # under the text (KMail, Yandex, mutt, Sylpheed) frame the original; they are not in it.
    k = 0
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k < len(lines) and _FRAME_RULE_RE.match(lines[k]):
        lines = lines[k + 1:]
    end = len(lines)
    while end > 0 and (
        not lines[end - 1].strip()
        or _is_end_marker(lines[end - 1])
        or _FRAME_RULE_RE.match(lines[end - 1])
    ):
        end -= 1
    return _join(lines[:end])


def _attribution_sender(line: str) -> tuple[Mailbox, str, str] | None:
    """(sender, name as written, date text) from a one-line introduction that names the
    original's author: "On 28/10/2021 12:46, "John Doe" <john@x> wrote:" (Outlook for Mac)
    or "26.11.2026, 10:03, "Иван Петров" <ivan@x>:" (Yandex's forward header)."""
    line = line.strip()
    if not line.endswith((":", "：")) or len(line) > 300:
        return None
    cleaned = _clean_mailto(line)
    m = _EMAIL_RE.search(cleaned)
    if not m:
        return None
    before = cleaned[: m.start()].rstrip(" (<")
    q = re.search(r"[\"«“„']\s*([^\"«»“”„']+?)\s*[\"»”“']\s*$", before)
    if q:
        name = q.group(1)
    else:
        seg = before.split(",")[-1]
        seg = re.sub(r"^.*\d[:.]\d\d(?:[:.]\d\d)?\s*(?:[AaPp]\.?[Mm]\.?)?", "", seg)
        words = seg.split()
        while words and not words[0][:1].isupper():
            words.pop(0)
        name = " ".join(words)
    try:
        address = normalize_address(m.group(0))
    except AddressError:
        return None
    dm = _DATE_IN_LINE_RE.search(line)
    date_raw = dm.group(0) if dm else line
    return Mailbox(address, decode_words(name.strip())), line, date_raw


def _try_separator(
    lines: list[str], i: int, kind: str, rest: str, default_tz: tzinfo, subject: str
) -> ForwardedMessage | None:
    d, content = _depth(lines[i])
    note = _note(lines, i)
    opener = _phrase_key(content.strip("-=_* \t"))
    if rest.strip():
        # Yahoo: the header block is on the separator line itself.
        fields = _glued_headers(rest)
        if "from" not in fields:
            return None
        return _make(fields, _body(_region(lines, i + 1, d), 0), note, default_tz)
    # Find where the header block starts: the first non-blank line after the separator,
    # which may be quoted one level deeper (Apple: "Begin forwarded message:" then "> From:").
    k = i + 1
    while k < len(lines) and not _depth(lines[k])[1].strip():
        k += 1
    if k >= len(lines):
        return None
    dk, _ = _depth(lines[k])
    depth = dk if dk >= d else d
    if dk < d:
        return None
    region = _region(lines, k, depth)
    block = _header_block(region, 0)
    if block is None or "from" not in block.fields:
        block = _inferred_block(region, 0) or block
    if block is not None and "from" in block.fields:
        return _make(block.fields, _body(region, block.end, opener), note, default_tz)
    if kind != "forward":
        return None
    fallback = strip_subject_prefixes(subject)
    intro = _attribution_sender(region[0]) if region else None
    if intro is not None:
        # Yandex: "26.11.2026, 10:03, "Name" <address>:" instead of a header block.
        sender, _raw, date_raw = intro
        fm = _make({"date": date_raw}, _body(region, 1, opener), note, default_tz, fallback)
        fm.from_, fm.from_raw = sender, region[0].strip()
        return fm
    # An explicit "Forwarded message" line with no readable header block still says
    # the text below is someone else's.
    fields = block.fields if block else {}
    return _make(fields, _body(region, block.end if block else 0), note, default_tz)


def _try_groupwise(
    lines: list[str], i: int, subject: str, default_tz: tzinfo
) -> ForwardedMessage | None:
    """GroupWise forwards and quotes with ">>> Name <address> date >>>" above the
    original, which is not quoted."""
    m = _GROUPWISE_RE.match(lines[i])
    if not m:
        return None
    intro = _attribution_sender(m.group("info") + ":")
    if intro is None:
        return None
    sender, _raw, date_raw = intro
    fallback = strip_subject_prefixes(subject)
    fm = _make({"date": date_raw}, _body(lines, i + 1), _note(lines, i), default_tz, fallback)
    fm.from_, fm.from_raw = sender, m.group("info").strip()
    return fm


def _plausible_sender(value: str) -> bool:
    """An address, or something shaped like a name: with a letter, a few words, no
    sentence ("No: 4711" in a note is a number, Latvian "No:" is also a From label)."""
    if _EMAIL_RE.search(value):
        return True
    words = value.split()
    return (
        any(ch.isalpha() for ch in value)
        and 0 < len(words) <= 8
        and len(value) <= 120
        and not value.rstrip().endswith((".", "?", "!"))
    )


def _caption(line: str) -> bool:
    """A short line that dates the block below it ("Message du 26/11/26 10:03", Orange)."""
    text = line.strip()
    return (
        0 < len(text) <= 60
        and _label_line(text) is None
        and parse_forward_date(text, UTC) is not None
    )


def _try_headerless(
    lines: list[str], i: int, default_tz: tzinfo
) -> ForwardedMessage | None:
    """A header block with no separator line above it (Outlook, GMX, Lotus Notes). It may
    begin with any field (GMX puts "Gesendet:" first, Thunderbird "Subject:") but must
    name the sender and two of date, To and subject, and start a paragraph, or follow a
    dating caption line."""
    d, content = _depth(lines[i])
    hdr = _header(content)
    if not hdr or hdr[0] == "other":
        return None
    note_end = i
    fields_extra: dict[str, str] = {}
    if i > 0:
        prev = _depth(lines[i - 1])[1]
        if prev.strip() and not _separator(prev):
            if not _caption(prev):
                return None  # must start a paragraph
            note_end = i - 1
            fields_extra["date"] = prev.strip()
    region = _region(lines, i, d)
    block = _header_block(region, 0)
    if block is None or "from" not in block.fields:
        return None
    others = sum(1 for f in ("date", "to", "subject") if f in block.fields)
    if others < 2 or not _plausible_sender(block.fields["from"]):
        return None
    fields = {**fields_extra, **block.fields}
    return _make(fields, _body(region, block.end), _note(lines, note_end), default_tz)


def _try_wrote(
    lines: list[str], i: int, subject: str, default_tz: tzinfo
) -> ForwardedMessage | None:
    """Outlook 2019 for Mac and others forward as a quoted reply: an intro line
    ("On 28/10/2021 12:46, "John Doe" <john@x> wrote:") then the indented original."""
    intro = _attribution_sender(lines[i])
    if intro is None:
        return None
    k = i + 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k >= len(lines) or not (lines[k].startswith(("  ", "\t")) or _depth(lines[k])[0]):
        return None
    quoted = bool(_depth(lines[k])[0])
    body_lines: list[str] = []
    for ln in lines[i + 1:]:
        if ln.strip() and not (ln.startswith((" ", "\t")) or _depth(ln)[0]):
            break
        body_lines.append(_dequote(ln, 1) if quoted else ln)
    body = textwrap.dedent("\n".join(body_lines)).strip()
    sender, raw, date_raw = intro
    date = parse_forward_date(date_raw, default_tz)
    return ForwardedMessage(
        from_=sender,
        to=[],
        cc=[],
        subject=strip_subject_prefixes(subject),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=body,
        note=_note(lines, i),
        source="inline",
        from_raw=raw,
    )


def _parse_one(text: str, subject: str | None, default_tz: tzinfo) -> ForwardedMessage | None:
    kind = _subject_kind(subject)
    lines = _prepare(text)
    for i, line in enumerate(lines):
        if kind != "reply" and line.lstrip().startswith(">>>"):
            found = _try_groupwise(lines, i, subject or "", default_tz)
            if found:
                return found
        _d, content = _depth(line)
        if not content.strip():
            continue
        sep = _separator_long(content)
        if sep:
            sep_kind, rest = sep
            if sep_kind == "generic" and kind == "reply":
                continue
            found = _try_separator(lines, i, sep_kind, rest, default_tz, subject or "")
            if found:
                return found
            continue
        if kind != "reply":
            found = _try_headerless(lines, i, default_tz)
            if found:
                return found
        if kind == "forward":
            found = _try_wrote(lines, i, subject or "", default_tz)
            if found:
                return found
    return None


def parse_inline_forward(
    text: str, default_tz: tzinfo = UTC, subject: str | None = None
) -> list[ForwardedMessage]:
    """Chain of inline-forwarded messages found in a plain-text body, outermost first
    (a forward of a forward gives 2 entries; the last is the innermost original).
    [] when the text holds no forward.

    ``subject`` is the outer message's Subject when known: a reply subject ("Re:")
    turns off the separators that Outlook also uses for quoted replies; a forward
    subject ("Fwd:", "TR:", "WG:"…) turns on "On … wrote:" forwards (Outlook for Mac)."""
    chain: list[ForwardedMessage] = []
    current_text = text
    current_subject = subject
    while len(chain) < _MAX_CHAIN:
        found = _parse_one(current_text, current_subject, default_tz)
        if found is None:
            break
        chain.append(found)
        current_text = found.body
        current_subject = found.subject if found.subject else None
    return chain


def separator_kind(line: str) -> str | None:
    """'forward' ("---------- Forwarded message ---------", "Begin forwarded message:" …)
    or 'generic' ("-----Original Message-----" and its translations, "_____" rules) when
    an unquoted line is a separator that clients put above a quoted message, else None.
    Shared with linking.replytext so that replies and forwards know the same separators."""
    sep = _separator(line)
    return sep[0] if sep else None


def header_block_at(
    lines: list[str], start: int, infer: bool = False
) -> tuple[dict[str, str], int] | None:
    """(fields, end) of the header block of a quoted or forwarded message starting at
    ``lines[start]`` ("From: / Sent: / To: / Subject:" in any of the languages above;
    fields are named from, date, to, cc, bcc, subject, reply-to); None when the line is
    not a known header line. ``end`` is the index of the first line after the block.
    With ``infer``, a block in an unknown language is read from its values instead."""
    hdr = _header(lines[start]) if start < len(lines) else None
    if hdr is None or hdr[0] == "other":
        block = _inferred_block(lines, start) if infer and start < len(lines) else None
        return (block.fields, block.end) if block else None
    block = _header_block(lines, start)
    if block is None:
        return None
    return block.fields, block.end


def has_forward_marker(text: str) -> bool:
    """Cheap pre-check: does any line look like a forward separator or a From header?"""
    for line in _prepare(text):
        if len(line) > 400 or (":" not in line and "-" not in line and "_" not in line
                               and "：" not in line):
            continue
        _d, content = _depth(line)
        if _separator_long(content):
            return True
        hdr = _header(content)
        if hdr and hdr[0] == "from":
            return True
    return False


# ---------------------------------------------------------------------------------------
# MIME


def _header_str(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except (ValueError, IndexError, TypeError, AttributeError):  # malformed header
        value = None
        for key, raw in msg.raw_items() if hasattr(msg, "raw_items") else []:
            if key.lower() == name.lower():
                value = raw
                break
    return "" if value is None else str(value)


def _part_text(part: Message) -> str:
    return part_text(part).replace("\r\n", "\n").replace("\r", "\n")


def _is_attachment(part: Message) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition == "attachment"


def _filename(part: Message) -> str:
    try:
        return part.get_filename() or ""
    except (ValueError, TypeError, LookupError):
        return ""


def _leaves(msg: Message) -> list[Message]:
    """Parts of ``msg`` without descending into attached messages."""
    out: list[Message] = []
    if msg.is_multipart() and msg.get_content_maintype() != "message":
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    out.extend(_leaves(sub))
        return out
    out.append(msg)
    return out


def _message_text(msg: Message) -> str:
    """The first text/plain part that is not an attachment, else the HTML as text."""
    leaves = _leaves(msg)
    for part in leaves:
        if part.get_content_type() == "text/plain" and not _is_attachment(part):
            return _part_text(part)
    for part in leaves:
        if part.get_content_type() == "text/html" and not _is_attachment(part):
            return html_to_text(_part_text(part))
    return ""


def _message_date(msg: Message, default_tz: tzinfo) -> tuple[datetime | None, str]:
    raw = _header_str(msg, "Date").strip()
    if not raw:
        return None, ""
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        parsed = None
    if parsed is None:
        return parse_forward_date(raw, default_tz), raw
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=default_tz)
    return parsed, raw


def _from_message(
    msg: Message, source: str, note: str, raw: bytes | None, default_tz: tzinfo
) -> ForwardedMessage:
    from_raw = _header_str(msg, "From")
    from_: Mailbox | None
    try:
        from_ = parse_strict_mailbox(from_raw)
    except AddressError:
        boxes = parse_address_list([from_raw])
        from_ = boxes[0] if boxes else None
    date, date_raw = _message_date(msg, default_tz)
    refs = _header_str(msg, "References").split()
    return ForwardedMessage(
        from_=from_,
        to=parse_address_list([_header_str(msg, "To")]),
        cc=parse_address_list([_header_str(msg, "Cc")]),
        subject=decode_words(_header_str(msg, "Subject")),
        date=date,
        date_raw=date_raw,
        date_flagged=date is None,
        body=_message_text(msg).strip(),
        note=note,
        source=source,
        message_id=_header_str(msg, "Message-ID").strip() or None,
        in_reply_to=_header_str(msg, "In-Reply-To").strip() or None,
        references=refs,
        raw=raw,
        from_raw=from_raw,
    )


def _attached_chains(
    sub: Message, raw: bytes | None, source: str, note: str, default_tz: tzinfo, level: int
) -> list[list[ForwardedMessage]]:
    head = _from_message(sub, source, note, raw, default_tz)
    if level >= _MAX_CHAIN:
        return [[head]]
    inner = _find(sub, default_tz, level + 1)
    if not inner:
        return [[head]]
    return [[head, *chain] for chain in inner]


def _find(msg: Message, default_tz: tzinfo, level: int) -> list[list[ForwardedMessage]]:
    chains: list[list[ForwardedMessage]] = []
    text = _message_text(msg)
    subject = _header_str(msg, "Subject") if msg.get("Subject") is not None else None
    inline = parse_inline_forward(text, default_tz, subject=subject)
    if inline:
        chains.append(inline)
    # What the forwarder wrote in the message that carries the attachments.
    note = text.strip()
    for part in _leaves(msg):
        if part is msg:
            continue
        ctype = part.get_content_type()
        name = _filename(part).lower()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            sub = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(sub, Message):
                try:
                    raw = sub.as_bytes(policy=policy.SMTP.clone(refold_source="none"))
                except (ValueError, TypeError, UnicodeError, LookupError):
                    raw = None
                chains.extend(_attached_chains(sub, raw, "rfc822", note, default_tz, level))
        elif name.endswith(".eml"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and data.strip():
                sub = BytesParser(policy=policy.default).parsebytes(data)
                chains.extend(
                    _attached_chains(sub, data, "eml-attachment", note, default_tz, level)
                )
    return chains


def find_forwards(msg: EmailMessage, default_tz: tzinfo = UTC) -> list[list[ForwardedMessage]]:
    """All forwarded originals carried by ``msg`` (parsed with policy.default): each
    attached message/rfc822 part, each attached .eml, Resent-* headers, or an inline
    forward in the first text/plain part (or the HTML as text when there is none).
    Each element is one chain, outermost first; [] when it is not a forward."""
    chains = _find(msg, default_tz, 0)
    # RFC 5322 §3.6.6: Resent-* fields mean the whole message was re-sent as it was; its
    # own From/To/Date are the original's.
    if any(msg.get(h) is not None for h in ("Resent-From", "Resent-Sender", "Resent-Date")):
        chains.append([_from_message(msg, "resent", "", None, default_tz)])
    return chains
