"""The store room: peewee models, database setup (SQLite or PostgreSQL), the visibility rule,
queries, the outbox queue, the group committer and CSV import.

It imports only the ground (``dealmail.config``, ``dealmail.clock``, ``dealmail.addresses``);
nothing here reads mail or speaks a protocol (docs/architecture.md).
"""
