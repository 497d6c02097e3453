"""The store: SQLite by default, any SQLAlchemy URL (PostgreSQL) when shared."""

from rbridge.store.db import Store, latest_store, open_store, store_url
from rbridge.store.models import Candidate, Decision, Evaluation, Meta, Plan, Run
from rbridge.store.results import Fit, Result, ResultChange  # registers the tables before create_all

__all__ = ["Store", "open_store", "store_url", "latest_store",
           "Plan", "Candidate", "Run", "Evaluation", "Decision", "Meta",
           "Result", "ResultChange", "Fit"]
