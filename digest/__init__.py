"""The features room: every email dealmail composes (digests, "which deal?" questions, answers to
them and to ``+ask`` requests) and their schedule. It imports linking, the store and the ground,
queues what it composes in the outbox queue, and never speaks SMTP (docs/architecture.md).
"""
