"""The engine interface the HTTP layer talks to (tests substitute a fake implementation)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from core.answers import Question
from service.engine.types import (
    AnswerOptions,
    AnswerResult,
    BundleMonitor,
    BundleStatus,
    EngineObserver,
    FeedbackOutcome,
)


class Engine(ABC):
    """Answers questions with a loaded bundle, manages bundles, joins feedback, reports monitoring state.

    All methods are called from the event-loop thread. Errors are :mod:`service.engine.errors` classes.
    """

    observer: EngineObserver = EngineObserver()

    def set_observer(self, observer: EngineObserver) -> None:
        self.observer = observer

    @abstractmethod
    async def start(self) -> None:
        """Begin accepting requests (called once the event loop runs)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop accepting requests, finish every queued and running one, release resources."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True while requests are accepted."""

    @property
    @abstractmethod
    def queue_depth_rows(self) -> int:
        """Rows waiting for a forward."""

    @abstractmethod
    async def answer(self, bundle: str, questions: list[Question],
                     options: AnswerOptions) -> list[AnswerResult]:
        """Answer questions with the current version of ``bundle``, one result per question, in order."""

    @abstractmethod
    async def load_bundle(self, name: str) -> BundleStatus:
        """Load ``name`` from the bundle root, or replace the loaded version (hot-swap)."""

    @abstractmethod
    async def unload_bundle(self, name: str) -> BundleStatus:
        """Stop serving ``name``; in-flight requests finish first, then its slots are freed."""

    def labels(self, bundle: str) -> tuple[str, ...] | None:
        """The label set of loaded ``bundle`` (its fixed choices), or None when it has none."""
        return None

    @abstractmethod
    def bundles(self) -> list[BundleStatus]:
        """Loaded bundles, sorted by name."""

    @abstractmethod
    async def feedback(self, request_id: str, correct_index: int) -> FeedbackOutcome:
        """Join a delayed label to an answered request (durably, when the prediction log is on)."""

    @abstractmethod
    def monitor(self) -> list[BundleMonitor]:
        """Per loaded bundle: window metrics and drift statistics (read at scrape time)."""
