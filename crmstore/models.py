"""Peewee models of the CRM store: companies, users, persons, deals, emails and what links them.

The models are declared unbound; :class:`crmstore.db.Store` binds them to its database when it
is built (peewee's model classes are process-wide, so one process serves one store at a time;
tests build a fresh store each). Rows reference users by id; users are mirrored from the config
at start-up so that sightings and deals can point at them.

Schema history is kept in :data:`SCHEMA_VERSION` and ``crmstore.migrations``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from peewee import (
    AutoField,
    BlobField,
    BooleanField,
    CharField,
    DateTimeField,
    DecimalField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

SCHEMA_VERSION = 4


def utcnow() -> datetime:
    """Naive UTC timestamps are stored; every module gets 'now' from the app clock instead,
    this is only the column default for rows written by hand (admin tools, migrations)."""
    return datetime.now(UTC).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        legacy_table_names = False


class SchemaInfo(BaseModel):
    version = IntegerField()
    upgraded_at = DateTimeField(default=utcnow)


class Company(BaseModel):
    id = AutoField()
    slug = CharField(unique=True, max_length=64)
    name = CharField(max_length=200)


class User(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, backref="users", on_delete="CASCADE")
    address = CharField(unique=True, max_length=320)
    name = CharField(max_length=200, default="")
    role = CharField(max_length=16, default="user")
    active = BooleanField(default=True)


class Organization(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, backref="organizations", on_delete="CASCADE")
    name = CharField(max_length=300)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("company", "name"), True),)


class OrgDomain(BaseModel):
    id = AutoField()
    organization = ForeignKeyField(Organization, backref="domains", on_delete="CASCADE")
    company = ForeignKeyField(Company, on_delete="CASCADE")
    domain = CharField(max_length=255)

    class Meta:
        indexes = ((("company", "domain"), True),)


class Person(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, backref="persons", on_delete="CASCADE")
    name = CharField(max_length=300, default="")
    organization = ForeignKeyField(Organization, null=True, backref="persons",
                                   on_delete="SET NULL")
    auto_created = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)


class PersonAddress(BaseModel):
    id = AutoField()
    person = ForeignKeyField(Person, backref="addresses", on_delete="CASCADE")
    company = ForeignKeyField(Company, on_delete="CASCADE")
    address = CharField(max_length=320)

    class Meta:
        indexes = ((("company", "address"), True),)


class Deal(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, backref="deals", on_delete="CASCADE")
    external_id = CharField(max_length=64, null=True)
    title = CharField(max_length=300)
    status = CharField(max_length=8, default="open", index=True)  # open | won | lost
    person = ForeignKeyField(Person, null=True, backref="deals", on_delete="SET NULL")
    organization = ForeignKeyField(Organization, null=True, backref="deals",
                                   on_delete="SET NULL")
    owner = ForeignKeyField(User, null=True, backref="deals", on_delete="SET NULL")
    value = DecimalField(max_digits=14, decimal_places=2, null=True)
    currency = CharField(max_length=3, default="")
    stage = CharField(max_length=100, default="")
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)


class Thread(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, on_delete="CASCADE")
    subject_key = CharField(max_length=300, index=True)
    deal = ForeignKeyField(Deal, null=True, backref="threads", on_delete="SET NULL")
    created_at = DateTimeField(default=utcnow)
    last_at = DateTimeField(default=utcnow)


class Email(BaseModel):
    id = AutoField()
    company = ForeignKeyField(Company, on_delete="CASCADE")
    # Dedupe key: the Message-ID, else a hash of the normalised content; unique per company.
    dedupe_key = CharField(max_length=400)
    message_id = CharField(max_length=400, null=True, index=True)
    content_hash = CharField(max_length=64)
    thread = ForeignKeyField(Thread, backref="emails", on_delete="CASCADE")
    subject = TextField(default="")
    date = DateTimeField(index=True)
    from_address = CharField(max_length=320, default="")
    from_name = CharField(max_length=300, default="")
    to_json = TextField(default="[]")
    cc_json = TextField(default="[]")
    in_reply_to = CharField(max_length=400, null=True)
    references = TextField(default="")
    thread_index = CharField(max_length=64, null=True, index=True)
    snippet = TextField(default="")
    attachments_json = TextField(default="[]")
    size = IntegerField(default=0)
    raw = BlobField()
    # "bcc" copies keep the real headers; a forward stores the original's fields above and
    # keeps the forward itself in raw.
    kind = CharField(max_length=16, default="bcc")
    forward_json = TextField(null=True)
    created_at = DateTimeField(default=utcnow)
    # The email's handle ``E<number>`` (crmstore/handles.py): per company, never reused
    # (EmailCounter), so a command in an old digest never reaches a newer email.
    number = IntegerField(null=True)

    class Meta:
        indexes = ((("company", "dedupe_key"), True),)


class Sighting(BaseModel):
    """One user's copy of an email: who brought it, by which channel, and who may see it."""

    id = AutoField()
    email = ForeignKeyField(Email, backref="sightings", on_delete="CASCADE")
    user = ForeignKeyField(User, backref="sightings", on_delete="CASCADE")
    channel = CharField(max_length=8)  # bcc | forward | relay | imap
    visibility = CharField(max_length=16)  # shared | private | quarantined
    queue_id = CharField(max_length=32, index=True)
    received_at = DateTimeField(index=True)
    envelope_from = CharField(max_length=320, default="")
    client_ip = CharField(max_length=64, default="")
    verification = CharField(max_length=16, default="none")
    evidence_json = TextField(default="{}")
    decisions_json = TextField(default="[]")

    class Meta:
        indexes = ((("email", "user"), True),)


class Participant(BaseModel):
    id = AutoField()
    email = ForeignKeyField(Email, backref="participants", on_delete="CASCADE")
    address = CharField(max_length=320, index=True)
    name = CharField(max_length=300, default="")
    role = CharField(max_length=4)  # from | to | cc
    person = ForeignKeyField(Person, null=True, backref="participations",
                             on_delete="SET NULL")


class Link(BaseModel):
    """An email (or a whole thread) linked to a person, a deal or an organization."""

    id = AutoField()
    email = ForeignKeyField(Email, null=True, backref="links", on_delete="CASCADE")
    thread = ForeignKeyField(Thread, null=True, backref="links", on_delete="CASCADE")
    person = ForeignKeyField(Person, null=True, backref="links", on_delete="CASCADE")
    deal = ForeignKeyField(Deal, null=True, backref="links", on_delete="CASCADE")
    organization = ForeignKeyField(Organization, null=True, backref="links",
                                   on_delete="CASCADE")
    source = CharField(max_length=8)  # auto | choice | address | admin | thread | relink | user
    created_at = DateTimeField(default=utcnow)


class PendingChoice(BaseModel):
    id = AutoField()
    token_hash = CharField(max_length=64, unique=True, null=True)
    user = ForeignKeyField(User, backref="pending_choices", on_delete="CASCADE")
    email = ForeignKeyField(Email, on_delete="CASCADE")
    thread = ForeignKeyField(Thread, on_delete="CASCADE")
    person = ForeignKeyField(Person, null=True, on_delete="SET NULL")
    candidates_json = TextField()  # deal ids in the order offered
    state = CharField(max_length=10, default="pending", index=True)  # pending|asked|answered|void
    created_at = DateTimeField()
    asked_at = DateTimeField(null=True)
    expires_at = DateTimeField(null=True)
    answered_at = DateTimeField(null=True)
    answer_deal = ForeignKeyField(Deal, null=True, on_delete="SET NULL")


class OutboxItem(BaseModel):
    """A message dealmail must send, written in the transaction that caused it."""

    id = AutoField()
    company = ForeignKeyField(Company, null=True, on_delete="SET NULL")
    kind = CharField(max_length=16)  # question | confirm | notice | digest | answer | relay | dsn
    mail_from = CharField(max_length=320)
    recipients_json = TextField()
    domain = CharField(max_length=255, default="")
    subject = TextField(default="")
    message = BlobField()
    state = CharField(max_length=10, default="queued", index=True)  # queued|sent|failed|dropped
    attempts = IntegerField(default=0)
    next_attempt_at = DateTimeField(index=True)
    lease_until = DateTimeField(null=True)
    last_error = TextField(default="")
    created_at = DateTimeField()
    sent_at = DateTimeField(null=True)
    dedupe_key = CharField(max_length=200, null=True, unique=True)


class AuditEntry(BaseModel):
    id = AutoField()
    at = DateTimeField(index=True)
    company = ForeignKeyField(Company, null=True, on_delete="SET NULL")
    actor = CharField(max_length=320, default="")
    action = CharField(max_length=40)
    email = ForeignKeyField(Email, null=True, on_delete="SET NULL")
    detail_json = TextField(default="{}")


# --------------------------------------------------------------------------- the user's inbox
# A user's control over their own copies (crmstore/inbox.py): handles, standing decisions about
# a thread, and the correspondents a user does not track.


class EmailCounter(BaseModel):
    """The last email number given in a company (handles are never reused)."""

    id = AutoField()
    company = ForeignKeyField(Company, unique=True, on_delete="CASCADE")
    last = IntegerField(default=0)


class ThreadVisibility(BaseModel):
    """A user's visibility for their copies of a thread, present and future
    (``private thread E12``); linking/record.py gives it to the user's next copies."""

    id = AutoField()
    thread = ForeignKeyField(Thread, on_delete="CASCADE")
    user = ForeignKeyField(User, on_delete="CASCADE")
    visibility = CharField(max_length=16)  # shared | private
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("thread", "user"), True),)


class ThreadUnlinked(BaseModel):
    """A thread a user unlinked from its deal (``unlink E12``): its later emails are neither
    linked to a deal automatically nor asked about, until a deal is named again."""

    id = AutoField()
    thread = ForeignKeyField(Thread, unique=True, on_delete="CASCADE")
    user = ForeignKeyField(User, null=True, on_delete="SET NULL")
    created_at = DateTimeField(default=utcnow)


class IgnoredCorrespondent(BaseModel):
    """An address (``ann@customer.test``) or a domain (``@customer.test``) a user does not
    track: linking/capture.py leaves it out of that user's copies."""

    id = AutoField()
    user = ForeignKeyField(User, on_delete="CASCADE")
    pattern = CharField(max_length=320)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("user", "pattern"), True),)


ALL_MODELS: list[type[BaseModel]] = [
    SchemaInfo, Company, User, Organization, OrgDomain, Person, PersonAddress, Deal, Thread,
    Email, Sighting, Participant, Link, PendingChoice, OutboxItem, AuditEntry,
    EmailCounter, ThreadVisibility, ThreadUnlinked, IgnoredCorrespondent,
]

# Secondary indexes that peewee's field flags cannot express.
EXTRA_INDEXES: list[tuple[type[BaseModel], tuple[str, ...], bool]] = [
    (Deal, ("person", "status"), False),
    (Link, ("email",), False),
    (Link, ("thread",), False),
    (Link, ("deal",), False),
    (Link, ("person",), False),
    (Participant, ("email",), False),
    (Participant, ("person",), False),
    (Sighting, ("user", "received_at"), False),
    (Email, ("thread", "date"), False),
    # The ingestion path's lookups filter by company first; with one large company a plain
    # company index matches everything, and SQLite (without ANALYZE statistics) picked it
    # and scanned 100,000 threads per message at 1M stored emails (bench scale). These put
    # the selective column right after the company.
    (Thread, ("company", "subject_key", "last_at"), False),
    (Email, ("company", "message_id"), False),
    (Email, ("company", "thread_index"), False),
    # Handles: one email per (company, number); NULL numbers (rows written before version 4
    # was backfilled, hand-made rows) do not collide on either backend.
    (Email, ("company", "number"), True),
]


# --------------------------------------------------------------------------- mailbox sync
# Mailbox sync over IMAP (mta/imapsync): one account row per configured mailbox, a checkpoint
# per folder, a row per message UID handled, and the relayed mail waiting to be filed in the
# user's Sent folder.


class MailboxAccount(BaseModel):
    """One configured mailbox of a user, its health, and which process holds it."""

    id = AutoField()
    # "<user address>/<username>@<host>": stable across restarts and config reloads.
    key = CharField(max_length=700, unique=True)
    user = ForeignKeyField(User, backref="mailbox_accounts", on_delete="CASCADE")
    state = CharField(max_length=10, default="new")  # new | ok | failing | stopped
    last_sync_at = DateTimeField(null=True)
    last_error = TextField(default="")
    failures = IntegerField(default=0)  # consecutive failed attempts
    failing_since = DateTimeField(null=True, index=True)
    next_retry_at = DateTimeField(null=True)
    # The lease: one process at a time syncs this account (mta/imapsync/lease.py).
    lease_holder = CharField(max_length=200, null=True)
    lease_until = DateTimeField(null=True)
    capabilities = TextField(default="")
    created_at = DateTimeField(default=utcnow)


class MailboxFolder(BaseModel):
    """The sync checkpoint of one folder: everything up to ``last_uid`` of ``uidvalidity`` is
    handled; written in the transaction that stored those messages."""

    id = AutoField()
    account = ForeignKeyField(MailboxAccount, backref="folders", on_delete="CASCADE")
    name = CharField(max_length=500)
    role = CharField(max_length=16, default="")  # inbox | sent | all | custom
    uidvalidity = IntegerField(null=True)
    last_uid = IntegerField(default=0)
    highest_modseq = IntegerField(null=True)
    uidnext = IntegerField(null=True)
    since = DateTimeField(null=True)  # history window of the first sync
    epochs = IntegerField(default=0)  # UIDVALIDITY changes seen
    last_sync_at = DateTimeField(null=True)

    class Meta:
        indexes = ((("account", "name"), True),)


class MailboxMessage(BaseModel):
    """One message UID handled by the sync; the unique key makes a re-read after a crash a
    no-op. ``state``: done (captured, repeat or ignored), failed (skipped with ``reason``),
    retry (our own fault; tried again, ``attempts`` counted)."""

    id = AutoField()
    account = ForeignKeyField(MailboxAccount, on_delete="CASCADE")
    folder = CharField(max_length=500)
    uidvalidity = IntegerField()
    uid = IntegerField()
    state = CharField(max_length=8)
    outcome = CharField(max_length=16, default="")
    reason = TextField(default="")
    email = ForeignKeyField(Email, null=True, on_delete="SET NULL")
    gm_msgid = CharField(max_length=32, null=True)
    truncated = BooleanField(default=False)
    attempts = IntegerField(default=1)
    at = DateTimeField()

    class Meta:
        indexes = ((("account", "folder", "uidvalidity", "uid"), True),)


class SentCopy(BaseModel):
    """Relayed mail to be APPENDed to the user's Sent folder once delivered (written in the
    relay's transaction; the raw copy is dropped once filed)."""

    id = AutoField()
    account = ForeignKeyField(MailboxAccount, on_delete="CASCADE")
    message_id = CharField(max_length=400, default="")
    outbox_ids = TextField(default="[]")
    raw = BlobField()
    state = CharField(max_length=10, default="waiting", index=True)  # waiting|done|dropped
    attempts = IntegerField(default=0)
    last_error = TextField(default="")
    created_at = DateTimeField()
    done_at = DateTimeField(null=True)


ALL_MODELS += [MailboxAccount, MailboxFolder, MailboxMessage, SentCopy]
EXTRA_INDEXES += [(MailboxMessage, ("account", "gm_msgid"), False),
                  (MailboxMessage, ("email",), False)]
