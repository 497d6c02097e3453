"""The store schema version this rbridge writes (the history of each version is in rbridge.store.models).

A module of its own so that reading it imports neither SQLAlchemy nor SQLModel: the
commands that only read a SQLite store (rbridge.store.sqlite_read) check it first.
"""

SCHEMA_VERSION = 9
