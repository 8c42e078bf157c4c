"""The verifier behind the sender gate (``linking.capture.SenderGate``).

``mta.senderauth`` says how sure we are that a message comes from its From (a level with
evidence); this module applies the company's policy to that level: accept, refuse, quarantine,
or defer when DNS failed while a stronger level was still possible (the gate turns these into
a disposition). It also builds our own Authentication-Results header (RFC 8601) for the stored
copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dealmail.config import Company, Config, User
from linking.capture import Evidence, Verification, Verifier
from linking.parse import ParsedMessage

from .senderauth import (
    LEVELS,
    DnsQuery,
    DnsTxt,
    SenderVerifier,
    dnspython_query,
    dnspython_txt,
    replay_key,
)


def accepts(company: Company, level: str) -> bool:
    """Whether ``level`` makes a message a user's tracked email for ``company``."""
    if level in company.accept_levels:
        return True
    return LEVELS.index(level) >= LEVELS.index(company.min_verification)


def crypto_verifier(
    config_of: Callable[[], Config],
    dns_txt: DnsTxt | None = None,
    dns_query: DnsQuery | None = None,
    clock: Callable[[], float] = time.time,
) -> Verifier:
    """A :data:`Verifier` backed by DKIM/upstream A-R/ARC/trusted network/SPF checks."""
    # One SenderVerifier (and dnspython resolver, which reads resolv.conf when built) per
    # config, rebuilt when a reload swaps the config: not one per message.
    built: dict[int, SenderVerifier] = {}

    def verifier_for(config: Config) -> SenderVerifier:
        found = built.get(id(config))
        if found is None:
            txt = dns_txt or dnspython_txt(timeout=config.policy.dns_timeout)
            query = dns_query or dnspython_query(timeout=config.policy.dns_timeout)
            built.clear()
            found = built[id(config)] = SenderVerifier(config.policy, txt, query,
                                                       clock=clock)
        return found

    def verify(raw: bytes, parsed: ParsedMessage, seen: Evidence, company: Company,
               user: User) -> Verification:
        config = config_of()
        verifier = verifier_for(config)
        verdict = verifier.verify(raw, parsed.from_.address, seen.client_ip,
                                  seen.envelope_from, seen.helo)
        accepted = accepts(company, verdict.level)
        evidence = verdict.as_dict()
        evidence["client_ip"] = seen.client_ip
        evidence["replay_key"] = replay_key(raw, verdict)
        header = verifier.authentication_results(
            config.policy.authserv_id, verdict, parsed.from_.address.rpartition("@")[2])
        return Verification(
            level=verdict.level,
            reason=verdict.reason,
            accepted=accepted,
            quarantine=not accepted and company.on_unverified == "quarantine",
            # A temporary DNS failure matters only when it may have hidden an accepted level.
            temp_error=verdict.temp_error and not accepted,
            evidence=evidence,
            header=f"Authentication-Results: {header}",
            covered=verdict.covered,
        )

    return verify
