"""The prediction log's interface, and the in-memory store used when the log is switched off.

The engine calls, from the event loop:

- :meth:`PredictionStore.write` before a response is sent: when it returns, the records are durable
  (for :class:`~service.predlog.sql.SqlPredictionStore`: committed);
- :meth:`PredictionStore.label` for ``POST /v1/feedback``: a durable, idempotent join (at most one label per
  request, whichever replica receives it);
- :meth:`PredictionStore.history` when a bundle version goes live, to rebuild its calibration windows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

from service.predlog.records import (
    AlreadyLabelledError,
    LabelledAnswer,
    LabelOutOfRangeError,
    PredictionRecord,
    UnknownRequestError,
    WindowHistory,
)


class PredictionStore(ABC):
    """Where answers and their delayed labels are kept."""

    durable: bool = False

    async def start(self) -> None:  # noqa: B027 (a store with nothing to open keeps this)
        """Open (and migrate) the store; called once the event loop runs."""

    async def stop(self) -> None:  # noqa: B027
        """Flush what is pending and close."""

    @abstractmethod
    async def write(self, records: list[PredictionRecord]) -> None:
        """Keep ``records``; for a durable store they are committed when this returns."""

    @abstractmethod
    async def label(self, request_id: str, label: int) -> LabelledAnswer:
        """Join ``label`` to an answered request. Raises :class:`UnknownRequestError`,
        :class:`AlreadyLabelledError` or :class:`LabelOutOfRangeError`."""

    @abstractmethod
    async def history(self, bundle: str, version: str, calibration_hash: str, labelled: int,
                      live: int) -> WindowHistory:
        """The last ``labelled`` labels and ``live`` answers of one bundle version, oldest first."""


def check_label(request_id: str, probabilities: list[float], label: int) -> None:
    if not 0 <= label < len(probabilities):
        raise LabelOutOfRangeError(f"correct_index {label} outside 0..{len(probabilities) - 1}")


@dataclass
class _Held:
    record: PredictionRecord
    label: int | None = None


class MemoryPredictionStore(PredictionStore):
    """The last ``capacity`` answers in process memory (``UQSERVE_PREDICTION_LOG=false``): a restart or a
    second replica loses the join, and nothing is rebuilt at start."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: OrderedDict[str, _Held] = OrderedDict()

    async def write(self, records: list[PredictionRecord]) -> None:
        for record in records:
            self._held[record.request_id] = _Held(record)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    async def label(self, request_id: str, label: int) -> LabelledAnswer:
        held = self._held.get(request_id)
        if held is None:
            raise UnknownRequestError(f"no answered request {request_id!r} is held (unknown or evicted; the "
                                      "prediction log is off)")
        record = held.record
        if held.label is not None:
            raise AlreadyLabelledError(f"request {request_id!r} already has a label", record.bundle)
        check_label(request_id, record.probabilities, label)
        held.label = label
        return LabelledAnswer(request_id, record.bundle, record.version, record.calibration_hash,
                              record.probabilities, label)

    async def history(self, bundle: str, version: str, calibration_hash: str, labelled: int,
                      live: int) -> WindowHistory:
        return WindowHistory()
