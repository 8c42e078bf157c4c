"""The authenticated relay (submission listeners) and the outbox delivery worker: MX or
smarthost routes, retries, DSNs. The only code that sends mail is ``mta.relay.worker``.
"""
