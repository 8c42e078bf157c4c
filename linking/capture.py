"""The one capture path: every mail source hands a message here, and gets one answer back.

Sources (the inbound SMTP listener, the submission relay, the LMTP listener behind the
company's MTA, mailbox sync over IMAP) are adapters. Each turns what it received into a
source-neutral :class:`CaptureRequest` (the raw bytes, the channel, whose mail it is or who
claims to have sent it, the evidence of how it arrived, the deal the sender asked for) and maps
the source-neutral :class:`Disposition` back to its own answer: an SMTP reply (see
``mta/replies.py``), or "UID done / retry later / skip" for a mailbox.

Everything in between happens once, here, in this order:

1. **read** the header block (``linking.parse``); an unreadable message is refused
   (``refused_content``), an automatic one (RFC 3834) is ``ignored``, so no loop can start;
2. **gate** the sender (:class:`SenderGate`): whose mail this is and whether that is believed;
3. **choose the originals**: the message itself, or the customer's original(s) it forwards,
   without those whose customers the user all ignores (:func:`drop_ignored`);
4. **record** them (``linking.record``) inside the caller's transaction, then run the hooks
   registered on :class:`Capture` (queueing a "which deal?" question is one, registered by the
   application), still inside that transaction.

Steps 1-3 run in a worker thread with no write access (:meth:`Capture.prepare`); step 4 is the
:data:`Commit` it returns, which the source runs in the store's transaction (the group
committer for the SMTP listeners, so that the reply is sent only once the commit returned).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from peewee import fn

from crmstore import models as m
from crmstore.inbox import ignored_patterns, is_ignored
from dealmail.addresses import AddressError, parse_strict_mailbox
from dealmail.config import Company, Config, User

from .originals import originals_for, plain_original
from .parse import NESTED_TOO_DEEPLY, MessageRejected, ParsedMessage, parse_message
from .quarantine import release_quarantined
from .record import Arrival, Directory, Original, RecordResult, record_email

__all__ = [
    "AfterRecord",
    "Capture",
    "CaptureRequest",
    "Commit",
    "Disposition",
    "Evidence",
    "Outcome",
    "SenderGate",
    "Trust",
    "Verification",
    "Verifier",
    "drop_ignored",
]

log = logging.getLogger("dealmail.capture")


# --------------------------------------------------------------------------- requests


class Trust(StrEnum):
    """How a source vouches for whose mail a message is."""

    #: Nobody vouches: the header From names a user, and the company's sender-verification
    #: policy decides whether that is believed (the Smart BCC address, answers, ``+ask``).
    VERIFY = "verify"
    #: The source authenticated the user (SMTP AUTH): From, Sender and Resent-From must be
    #: addresses of that user.
    LOGIN = "login"
    #: The message was read from the user's own mailbox, or handed over by the company's MTA
    #: as mail the user received: From is a correspondent, nobody is impersonated.
    MAILBOX = "mailbox"


@dataclass(frozen=True)
class Evidence:
    """How a message reached dealmail, as far as the source knows."""

    client_ip: str = ""
    helo: str = ""
    envelope_from: str = ""
    authenticated_as: str | None = None
    tls: bool = False
    #: Source-specific facts kept with the sighting (mailbox and UID, XFORWARD attributes).
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptureRequest:
    """One message handed to the capture path by a source."""

    raw: bytes
    #: ``bcc`` (the Smart BCC address; becomes ``forward`` when it carries forwarded
    #: originals), ``relay``, ``mta`` (a copy from the company's MTA) or ``imap``.
    channel: str
    company: Company
    queue_id: str
    evidence: Evidence = field(default_factory=Evidence)
    trust: Trust = Trust.VERIFY
    #: The user whose mail this is, when the source knows it (``LOGIN``, ``MAILBOX``).
    user: User | None = None
    #: A deal the sender named (``<slug>+deal<ID>@``).
    deal_id: int | None = None
    #: Envelope recipients (the relay's Bcc recipients are customers too).
    recipients: tuple[str, ...] = ()
    #: When it arrived; the capture's clock when not given.
    received_at: datetime | None = None


# --------------------------------------------------------------------------- answers


class Outcome(StrEnum):
    STORED = "stored"  # recorded (a new email, or a new sighting of a known one)
    REPEAT = "repeat"  # this user already has this message: nothing written
    IGNORED = "ignored"  # accepted and not tracked (automatic, internal only)
    REFUSED_SENDER = "refused_sender"  # the sender may not do this or is not believed
    REFUSED_CONTENT = "refused_content"  # the message cannot be read safely
    DEFERRED = "deferred"  # a temporary condition (DNS): try again later


@dataclass(frozen=True)
class Disposition:
    """What became of a captured message, in terms every source can map to its answer."""

    outcome: Outcome
    reason: str = ""
    #: The enhanced status code (RFC 3463) that best describes a refusal or deferral.
    status: str = ""
    results: tuple[RecordResult, ...] = ()
    quarantined: bool = False
    #: The user the message was captured for (None when refused before the gate decided).
    user: User | None = None

    @property
    def final(self) -> bool:
        """Whether retrying the same message can change the answer."""
        return self.outcome is not Outcome.DEFERRED

    @property
    def accepted(self) -> bool:
        return self.outcome in (Outcome.STORED, Outcome.REPEAT, Outcome.IGNORED)

    @property
    def email_ids(self) -> list[int]:
        return [r.email_id for r in self.results]


Commit = Callable[[], Disposition]
AfterRecord = Callable[[RecordResult, User, Company], None]
# Checks the DKIM signatures of an attached original: (raw, from domain) -> results.
SignatureCheck = Callable[[bytes, str], list[dict[str, Any]]]


# --------------------------------------------------------------------------- the gate


@dataclass
class Verification:
    """The sender verifier's answer for one message."""

    level: str
    reason: str
    accepted: bool
    quarantine: bool = False
    temp_error: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
    header: str | None = None  # our Authentication-Results line for the stored copy
    #: When the level rests on a signature of the headers (DKIM, ARC): the header names it
    #: wholly covers. Linking reads no other address header, so a header a replay could have
    #: added never makes a participant or a person (it stays in the stored raw message).
    #: None: no such restriction (trusted network, upstream A-R, login, mailbox).
    covered: frozenset[str] | None = None


# (raw bytes, parsed header block, evidence, company, claimed user) -> verification. The
# implementation (DKIM, upstream Authentication-Results, ARC, trusted networks, SPF) is the
# transport's: mta/verification.py.
Verifier = Callable[[bytes, ParsedMessage, Evidence, Company, User], Verification]


@dataclass(frozen=True)
class Admitted:
    """The gate's yes: the message is ``user``'s, believed at ``verification.level``."""

    user: User
    verification: Verification
    quarantined: bool = False


class SenderGate:
    """Whose mail a message is, and whether that claim is believed; the one place every
    handler and source asks (Smart BCC, answers to questions, ``+ask``, the relay, LMTP,
    mailbox sync)."""

    def __init__(self, config_of: Callable[[], Config], verifier: Verifier) -> None:
        self.config_of = config_of
        self.verifier = verifier

    def admit(self, parsed: ParsedMessage, request: CaptureRequest, *,
              allow_quarantine: bool = True) -> Admitted | Disposition:
        if request.trust is Trust.VERIFY:
            return self._verify(parsed, request, allow_quarantine)
        user = request.user
        if user is None:
            raise ValueError(f"trust {request.trust} needs the request's user")
        if request.trust is Trust.LOGIN:
            return self._login(parsed, user, request)
        return Admitted(user, Verification(
            level="mailbox", reason="the user's own mailbox", accepted=True,
            evidence={"method": "mailbox", **request.evidence.details}))

    def _verify(self, parsed: ParsedMessage, request: CaptureRequest,
                allow_quarantine: bool) -> Admitted | Disposition:
        company = request.company
        sender = parsed.from_.address
        found = self.config_of().find_user(sender)
        if found is None or found[0].slug != company.slug:
            return Disposition(Outcome.REFUSED_SENDER,
                               f"<{sender}> is not allowed to use this address", "5.7.1")
        user = found[1]
        verdict = self.verifier(request.raw, parsed, request.evidence, company, user)
        if verdict.temp_error:
            return Disposition(Outcome.DEFERRED, "Sender verification failed temporarily: "
                               f"{verdict.reason}", "4.7.5", user=user)
        if verdict.accepted:
            return Admitted(user, verdict)
        if verdict.quarantine and allow_quarantine:
            return Admitted(user, verdict, quarantined=True)
        return Disposition(
            Outcome.REFUSED_SENDER,
            f"Message from <{sender}> could not be verified: {verdict.reason}. If this is "
            "your address, send from your login address or ask your admin to list it among "
            "your alternate addresses", "5.7.1", user=user)

    def _login(self, parsed: ParsedMessage, user: User,
               request: CaptureRequest) -> Admitted | Disposition:
        # RFC 6409 §8.1 lets a submission server refuse a message whose originator fields are
        # not the authenticated user's: From, Sender, and the Resent-From/Resent-Sender of a
        # resent message (RFC 5322 §3.6.6) all name who sends it.
        claimed = [parsed.from_.address]
        for name in ("sender", "resent-from", "resent-sender"):
            for value in parsed.headers.get_all(name, []):
                try:
                    claimed.append(parse_strict_mailbox(str(value)).address)
                except AddressError:
                    return Disposition(Outcome.REFUSED_CONTENT,
                                       f"unreadable {name.title()} header", "5.6.0", user=user)
        for address in claimed:
            if address not in user.addresses:
                return Disposition(Outcome.REFUSED_SENDER,
                                   f"Sender address rejected: <{address}> not owned by user "
                                   f"{user.address}", "5.7.1", user=user)
        evidence = request.evidence
        return Admitted(user, Verification(
            level="authenticated", reason="SMTP AUTH", accepted=True,
            evidence={"method": "smtp-auth", "login": user.address, "tls": evidence.tls},
            header=(f"Authentication-Results: {self.config_of().policy.authserv_id}; "
                    f"auth=pass smtp.auth={user.address}")))


# --------------------------------------------------------------------------- capture


# Channels on which mail with no customer among its participants is not tracked: the user
# did not ask for this particular message to be kept (unlike a copy sent to the Smart BCC
# address, which is always the user's explicit wish).
_AUTOMATIC_CHANNELS = frozenset({"relay", "mta", "imap"})


class Capture:
    """The capture path (see the module docstring). Built once by the application."""

    def __init__(self, config_of: Callable[[], Config], directory_of: Callable[[], Directory],
                 now: Callable[[], datetime], gate: SenderGate,
                 signature_check: SignatureCheck | None = None) -> None:
        self.config_of = config_of
        self.directory_of = directory_of
        self.now = now
        self.gate = gate
        self.signature_check = signature_check
        self._hooks: list[AfterRecord] = []

    def add_hook(self, hook: AfterRecord) -> None:
        """Run ``hook`` after each newly recorded copy, inside the same transaction."""
        self._hooks.append(hook)

    def read(self, raw: bytes) -> ParsedMessage | Disposition:
        """The parsed header block, or the final answer when the message must go no further
        (unreadable: refused; automatic: accepted and ignored, RFC 3834 §2)."""
        try:
            parsed = parse_message(raw, self.config_of().limits)
        except MessageRejected as exc:
            return Disposition(Outcome.REFUSED_CONTENT, exc.reason, "5.6.0")
        if parsed.is_auto:
            return Disposition(Outcome.IGNORED, f"automatic message ({parsed.auto_reason})")
        return parsed

    def prepare(self, request: CaptureRequest,
                parsed: ParsedMessage | None = None) -> Disposition | Commit:
        """Read, gate and choose the originals (worker thread, no writes). Returns the final
        answer, or the commit to run inside the store's transaction."""
        try:
            return self._prepare(request, parsed)
        except RecursionError:
            # linking.parse.check_structure caps the nesting before any recursive walk; this
            # is the last guard: a permanent refusal, never a 451 that is retried for days.
            done = Disposition(Outcome.REFUSED_CONTENT, NESTED_TOO_DEEPLY, "5.6.0")
            self._log(request, parsed, done)
            return done

    def _prepare(self, request: CaptureRequest,
                 parsed: ParsedMessage | None) -> Disposition | Commit:
        qid = request.queue_id
        if parsed is None:
            read = self.read(request.raw)
            if isinstance(read, Disposition):
                self._log(request, None, read)
                return read
            parsed = read
        admitted = self.gate.admit(parsed, request)
        if isinstance(admitted, Disposition):
            self._log(request, parsed, admitted)
            return admitted
        user, verdict = admitted.user, admitted.verification
        if verdict.covered is not None:
            parsed = signed_part(parsed, verdict.covered)
        config = self.config_of()
        directory = self.directory_of()
        now = request.received_at or self.now()
        evidence = request.evidence
        if request.trust is Trust.VERIFY and evidence.envelope_from and (
                evidence.envelope_from.lower() not in user.addresses):
            log.info("[%s] %s envelope sender <%s> is not an address of %s", qid,
                     parsed.message_id or "-", evidence.envelope_from, user.address)
        if request.channel == "bcc":
            company_id = directory.company_ids[request.company.slug]
            channel, originals, _chains = originals_for(
                parsed, user, config, now,
                name_lookup=lambda name: person_address_by_name(company_id, name))
        else:
            channel, originals = request.channel, [plain_original(parsed, now)]
        if channel in _AUTOMATIC_CHANNELS and not self._has_customer(
                request, parsed, directory):
            done = Disposition(Outcome.IGNORED, "no customer among the participants",
                               user=user)
            self._log(request, parsed, done)
            return done
        originals, ignored = drop_ignored(
            originals, directory.user_ids[user.address],
            lambda address: directory.is_internal(request.company, address),
            extra=user.never_track)
        if not originals:
            done = Disposition(Outcome.IGNORED, "only correspondents this user does not "
                               "track", user=user)
            self._log(request, parsed, done)
            return done
        if self.signature_check is not None:
            for original in originals:
                # An attached original keeps its own signature: record whether it verifies,
                # as evidence of who wrote it (it never makes the forward itself verified).
                if original.original_raw and original.forward is not None:
                    original.forward["dkim"] = self.signature_check(
                        original.original_raw, original.from_.address.rpartition("@")[2])
        # The source's own facts (XFORWARD attributes, mailbox and UID) are kept with the
        # verdict's, which win on a clash.
        sighting_evidence = {**evidence.details, **verdict.evidence}
        if verdict.header:
            # RFC 8601 §5: our verdict is the topmost header of this user's stored copy. It
            # is kept with the sighting (each copy is verified on its own) and prepended when
            # the copy is exported (crmstore.queries.stored_copy), so a 25 MB message is not
            # copied again to gain one header line.
            sighting_evidence["authentication_results"] = verdict.header
        arrival = Arrival(
            user=user, company=request.company, channel=channel, queue_id=qid,
            received_at=now, envelope_from=evidence.envelope_from,
            client_ip=evidence.client_ip, verification=verdict.level,
            evidence=sighting_evidence, deal_id=request.deal_id,
            quarantined=admitted.quarantined, ignored=ignored)
        # One line per message, written with its rows (a line here and another at the
        # commit cost 4% of an ingesting worker's CPU): who sent it, at which level and
        # through which channel; a quarantined copy says so, with the reason.
        source = f"from {user.address} ({verdict.level}, {channel})"
        if admitted.quarantined:
            source += f" [{verdict.reason}]"
        raw = request.raw

        def commit() -> Disposition:
            results = self.record(config, directory, originals, raw, arrival, source)
            outcome = (Outcome.REPEAT if all(r.duplicate for r in results)
                       else Outcome.STORED)
            return Disposition(outcome, results=tuple(results),
                               quarantined=admitted.quarantined, user=user)

        return commit

    def record(self, config: Config, directory: Directory, originals: Sequence[Original],
               raw: bytes, arrival: Arrival, source: str = "") -> list[RecordResult]:
        """Store and link one received copy, inside the caller's transaction, and run the
        hooks for each newly recorded email. ``source`` (who sent it, how) joins the log
        line."""
        results = []
        for original in originals:
            result = record_email(config, directory, original, raw, arrival)
            if result.duplicate:
                note_repeat(result, arrival)
            elif not arrival.quarantined:
                # A quarantined copy reaches nobody (no question, no notice) until it is
                # released (Capture.release runs the hooks then).
                for hook in self._hooks:
                    hook(result, arrival.user, arrival.company)
            results.append(result)
        for original, result in zip(originals, results, strict=True):
            log.info("[%s] %s %s as email #%s%s%s: %s", arrival.queue_id,
                     original.message_id or "-",
                     "quarantined" if arrival.quarantined else "stored", result.email_id,
                     " (repeat, no-op)" if result.duplicate else "",
                     f" {source}" if source else "",
                     "; ".join(result.decisions) or "no decision")
        return results

    def release(self, email_id: int, actor: str, user_address: str | None = None,
                ) -> RecordResult | None:
        """Release a quarantined copy (``linking.quarantine``) and run the hooks for it, inside
        the caller's transaction. None when there is no such quarantined copy."""
        released = release_quarantined(self.config_of(), email_id, self.now(), actor,
                                       user_address)
        if released is None:
            return None
        for hook in self._hooks:
            hook(released.result, released.user, released.company)
        log.info("email #%s released from quarantine for %s by %s", email_id,
                 released.user.address, actor)
        return released.result

    def _has_customer(self, request: CaptureRequest, parsed: ParsedMessage,
                      directory: Directory) -> bool:
        company = request.company
        everyone = [*request.recipients,
                    *(b.address for b in [parsed.from_, *parsed.to, *parsed.cc])]
        return any(not directory.is_internal(company, a.lower()) for a in everyone)

    def _log(self, request: CaptureRequest, parsed: ParsedMessage | None,
             done: Disposition) -> None:
        mid = (parsed.message_id if parsed is not None else None) or "-"
        who = parsed.from_.address if parsed is not None else request.evidence.client_ip
        log.info("[%s] %s %s (%s) from %s: %s", request.queue_id, mid, done.outcome.value,
                 request.channel, who, done.reason)


def signed_part(parsed: ParsedMessage, covered: frozenset[str]) -> ParsedMessage:
    """``parsed`` as far as a signature covering the header names ``covered`` vouches for
    it: an address list the signature does not wholly cover is read as empty. (The sender
    gate has already required From to be covered.)"""
    dropped = [name for name in ("to", "cc") if getattr(parsed, name) and name not in covered]
    if not dropped:
        return parsed
    log.info("%s: %s not covered by the signature: not used for linking",
             parsed.message_id or "-", ", ".join(n.title() for n in dropped))
    return replace(parsed, to=[] if "to" in dropped else parsed.to,
                   cc=[] if "cc" in dropped else parsed.cc)


def person_address_by_name(company_id: int, name: str) -> str | None:
    """The first address of the one person of the company whose name is exactly ``name``
    (compared case-insensitively, spaces collapsed); None when there is none or several."""
    # str.lower, not casefold: the comparison must agree with the database's LOWER().
    wanted = " ".join(name.split()).lower()
    if not wanted:
        return None
    rows = list(m.Person.select(m.Person.id)
                .where((m.Person.company == company_id)
                       & (fn.LOWER(m.Person.name) == wanted)).limit(2))
    if len(rows) != 1:
        return None
    first = (m.PersonAddress.select(m.PersonAddress.address)
             .where(m.PersonAddress.person == rows[0].id).order_by(m.PersonAddress.id).first())
    return str(first.address) if first is not None else None


# --------------------------------------------------------------------------- ignored correspondents


def drop_ignored(originals: Sequence[Original], user_id: int,
                 is_internal: Callable[[str], bool],
                 extra: Sequence[str] = ()) -> tuple[list[Original], frozenset[str]]:
    """A user's own ignore list (``ignore ann@customer.test``, ``ignore @customer.test``;
    ``crmstore.inbox``) applied to the originals of one copy of theirs, whatever its source.

    An original whose customers are all ignored is not tracked for this user. In the others,
    the ignored correspondents are neither linked nor created as persons (they stay in the
    stored email's own header fields and participants, which are the email's data), so a
    customer the user does track keeps the conversation. An original without any customer
    (internal mail sent to the company address) is left as it is. Returns the originals to
    record and the ignored addresses among them (``Arrival.ignored``). ``extra``: the
    admin's list for this user (config ``never_track``: addresses and domains)."""
    patterns = ignored_patterns(user_id) | frozenset(
        e if "@" in e else f"@{e}" for e in extra)
    if not patterns:
        return list(originals), frozenset()
    kept: list[Original] = []
    skipped: set[str] = set()
    for original in originals:
        customers = {b.address.lower() for b in [original.from_, *original.to, *original.cc]
                     if not is_internal(b.address.lower())}
        hit = {a for a in customers if is_ignored(a, patterns)}
        skipped |= hit
        if customers and hit == customers:
            continue
        kept.append(original)
    return kept, frozenset(skipped)


def note_repeat(result: RecordResult, arrival: Arrival) -> None:
    """A copy this user already has. The same bytes from another network or envelope are a
    replay of a signed message by someone who received it: log it and keep it in the audit
    log (the user's digest lists it); the first copy stays the only one."""
    first = (m.Sighting.select().where(m.Sighting.email == result.email_id)
             .order_by(m.Sighting.id).first())
    if first is None:
        return
    if (first.client_ip, first.envelope_from.lower()) == (
            arrival.client_ip, arrival.envelope_from.lower()):
        return
    log.warning("[%s] replay attempt: email #%s first received from %s <%s>, again from %s "
                "<%s>", arrival.queue_id, result.email_id, first.client_ip,
                first.envelope_from, arrival.client_ip, arrival.envelope_from)
    m.AuditEntry.create(
        at=arrival.received_at.replace(tzinfo=None), company=first.email.company_id,
        actor=arrival.user.address, action="replay", email=result.email_id,
        detail_json=json.dumps({"client_ip": arrival.client_ip,
                                "envelope_from": arrival.envelope_from,
                                "queue_id": arrival.queue_id}))
