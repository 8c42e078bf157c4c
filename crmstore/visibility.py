"""Who may see an email: the one rule every listing, digest, answer and CLI output goes through.

The rule (docs/architecture.md, rules 6 and 7):

* the owner of a sighting sees the email;
* a colleague (same company) sees it only if some sighting of it is ``shared`` **and** the email,
  or its thread, is linked to a person or a deal;
* a ``private`` sighting is seen by its owner alone — admins included; a ``quarantined`` one by
  nobody (it is only listed, not shown, in the claimed owner's digest).

:func:`visible_to` returns the rule as a SQL condition, so listings filter in the database;
:func:`can_see` applies the same condition to one email. There is no other implementation.
:func:`known_persons` follows from it: a person created automatically exists only because of
someone's mail, so it is named only to a user who may see an email it is part of.
"""

from __future__ import annotations

from peewee import JOIN, Expression, fn

from . import models as m


def _linked(email_model: type[m.Email]) -> Expression:
    link = m.Link.alias("vis_link")
    thread = m.Thread.alias("vis_thread")
    email_linked = fn.EXISTS(
        link.select(link.id).where(
            (link.email == email_model.id) & (link.person.is_null(False) | link.deal.is_null(False))
        )
    )
    thread_link = m.Link.alias("vis_tlink")
    thread_linked = fn.EXISTS(
        thread.select(thread.id)
        .join(thread_link, JOIN.LEFT_OUTER, on=(thread_link.thread == thread.id))
        .where(
            (thread.id == email_model.thread)
            & (thread.deal.is_null(False)
               | thread_link.person.is_null(False)
               | thread_link.deal.is_null(False))
        )
    )
    return email_linked | thread_linked


def visible_to(user: m.User, email_model: type[m.Email] = m.Email) -> Expression:
    """SQL condition: ``user`` may see the row of ``email_model``."""
    own = m.Sighting.alias("vis_own")
    shared = m.Sighting.alias("vis_shared")
    owns = fn.EXISTS(
        own.select(own.id).where(
            (own.email == email_model.id) & (own.user == user.id)
            & (own.visibility != "quarantined")
        )
    )
    shared_exists = fn.EXISTS(
        shared.select(shared.id).where(
            (shared.email == email_model.id) & (shared.visibility == "shared")
        )
    )
    same_company = email_model.company == user.company_id
    return owns | (same_company & shared_exists & _linked(email_model))


def can_see(user: m.User, email_id: int) -> bool:
    """Whether ``user`` may see email ``email_id`` (the same rule as :func:`visible_to`)."""
    return (
        m.Email.select(m.Email.id)
        .where((m.Email.id == email_id) & visible_to(user))
        .exists()
    )


def known_persons(user: m.User) -> Expression:
    """SQL condition on :class:`~crmstore.models.Person`: the persons ``user`` may be told
    about — imported ones, and automatically created ones that take part in (or are linked
    to) an email the user may see. A colleague's private mail must not leak a name."""
    seen = m.Email.select(m.Email.id).where(visible_to(user))
    in_seen = m.Participant.select(m.Participant.person).where(
        m.Participant.email.in_(seen) & m.Participant.person.is_null(False))
    linked_seen = m.Link.select(m.Link.person).where(
        m.Link.email.in_(seen) & m.Link.person.is_null(False))
    return (m.Person.company == user.company_id) & (
        ~m.Person.auto_created | m.Person.id.in_(in_seen) | m.Person.id.in_(linked_seen))
