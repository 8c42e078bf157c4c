"""The commands offered beside each listed email: one-click ``mailto:`` links and their text.

Every email a digest or an answer lists carries its handle (``E12``). Beside the user's own
copies the HTML part offers one-click actions (Private or Share, Move to deal…, Unlink,
Forget): ``mailto:`` links (RFC 6068) to ``<slug>+ask@`` whose subject is the command, so any
mail client sends it; the text part shows the same commands to type. The words are the user's
language's (``digest/commands.py`` understands both).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

#: The command words each language shows in digests and answers.
KEYWORDS = {
    "en": {"private": "private", "share": "share", "deal": "deal", "unlink": "unlink",
           "person": "person", "forget": "forget", "ignore": "ignore", "track": "track",
           "thread": "thread", "show": "show"},
    "ja": {"private": "非公開", "share": "共有", "deal": "案件", "unlink": "紐付け解除",
           "person": "人物", "forget": "削除", "ignore": "無視", "track": "追跡",
           "thread": "スレッド", "show": "表示"},
}

LABELS = {
    "en": {"private": "Private", "share": "Share", "deal": "Move to deal…",
           "unlink": "Unlink", "forget": "Forget", "deal_target": "<deal number or title>",
           "deal_hint": "Write the deal's number or title after the handle in the subject, "
                        "then send."},
    "ja": {"private": "非公開", "share": "共有", "deal": "案件を変更…", "unlink": "紐付け解除",
           "forget": "削除", "deal_target": "<案件番号または案件名>",
           "deal_hint": "件名のハンドルの後に案件番号または案件名を書いて送信してください。"},
}


def keywords(language: str) -> dict[str, str]:
    return KEYWORDS.get(language, KEYWORDS["en"])


def mailto(address: str, subject: str, body: str = "") -> str:
    """A ``mailto:`` URI (RFC 6068): the address as is (its ``+`` needs no escape), subject
    and body percent-encoded as UTF-8 with spaces as ``%20`` (section 5: ``+`` would be read
    as a plus sign, not a space)."""
    uri = f"mailto:{address}?subject={quote(subject, safe='')}"
    if body:
        uri += f"&body={quote(body, safe='')}"
    return uri


def add_actions(items: list[dict[str, Any]], ask_address: str, language: str) -> None:
    """Give each listed email (``digest.digests.describe_emails`` rows) its commands:
    ``actions`` (label, command, href) for the user's own copies, none for a colleague's."""
    kw = keywords(language)
    lab = LABELS.get(language, LABELS["en"])
    for it in items:
        h = it["handle"]
        actions: list[dict[str, str]] = []
        if h and it["mine"]:
            flip = "share" if it["visibility"] == "private" else "private"
            actions.append({"key": flip, "label": lab[flip], "command": f"{kw[flip]} {h}"})
            actions.append({"key": "deal", "label": lab["deal"],
                            "command": f"{kw['deal']} {h} {lab['deal_target']}",
                            "subject": f"{kw['deal']} {h} ", "body": lab["deal_hint"]})
            if it["status"] in ("deal", "choice"):
                actions.append({"key": "unlink", "label": lab["unlink"],
                                "command": f"{kw['unlink']} {h}"})
            actions.append({"key": "forget", "label": lab["forget"],
                            "command": f"{kw['forget']} {h}"})
        for a in actions:
            a["href"] = mailto(ask_address, a.pop("subject", a["command"]), a.pop("body", ""))
        it["actions"] = actions
