"""The prediction log: every answer and its delayed label, durable before the response is sent.

:func:`open_store` picks the store from settings: SQLite under ``UQSERVE_STATE_DIR`` by default,
``UQSERVE_DATABASE_URL`` (PostgreSQL for fleets), or in memory when ``UQSERVE_PREDICTION_LOG=false``.
"""

from __future__ import annotations

from service.predlog.records import (
    AlreadyLabelledError,
    LabelledAnswer,
    LabelOutOfRangeError,
    PredictionLogError,
    PredictionRecord,
    UnknownRequestError,
    WindowHistory,
    texts_hash,
)
from service.predlog.store import MemoryPredictionStore, PredictionStore
from service.settings import Settings

__all__ = ["AlreadyLabelledError", "LabelOutOfRangeError", "LabelledAnswer", "MemoryPredictionStore",
           "PredictionLogError", "PredictionRecord", "PredictionStore", "UnknownRequestError", "WindowHistory",
           "open_store", "texts_hash"]


def open_store(settings: Settings) -> PredictionStore:
    """The store ``settings`` asks for (nothing is opened until :meth:`PredictionStore.start`)."""
    if not settings.prediction_log:
        return MemoryPredictionStore(settings.feedback_capacity)
    from service.predlog.sql import SqlPredictionStore

    return SqlPredictionStore(settings.log_database_url(), replica=settings.replica(),
                              retention_days=settings.log_retention_days, max_batch=settings.log_max_batch)
