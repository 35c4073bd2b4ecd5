"""Bundle registry with versioned, reference-counted entries, and the LoRA slot pool.

Hot-swap: ``install`` makes a new entry current for its name and retires the old one. Requests hold
the entry they acquired until they finish, so in-flight requests complete on the version they started
with while new ones get the new version. A retired entry's slots go back to the pool when its last
request releases it; they are cleared when a later load fills them. Everything here runs on the
event-loop thread (no locks needed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from core.answers import AnswerFormat
from core.bundle import AnswerSpaceSpec
from service.engine.errors import BundleNotFoundError, CapacityError
from service.engine.guarantees import BundleGuarantees
from service.engine.predictors import Predictor
from service.engine.types import BundleRef


@dataclass(eq=False)
class BundleEntry:
    """One loaded version of a bundle."""

    name: str
    generation: int  # unique per load, distinguishes reloads of the same manifest version
    predictor: Predictor
    ref: BundleRef
    space: AnswerSpaceSpec  # format, prompt, token budget, label set
    guarantees: BundleGuarantees  # conformal sets and risk control of this version's calibration
    notes: list[str] = field(default_factory=list)  # attached to every answer (e.g. a numerics mismatch)
    loaded_at: float = field(default_factory=time.time)
    refcount: int = 0
    retired: bool = False

    @property
    def slots(self) -> list[int]:
        return self.predictor.slots

    @property
    def answer_format(self) -> AnswerFormat:
        return self.space.answer_format

    @property
    def max_tokens(self) -> int:
        return self.space.max_tokens


class SlotPool:
    """Free LoRA slot indices of the engine's MultiLora."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CapacityError(f"needs {count} LoRA slots, {len(self._free)} of {self.num_slots} are free "
                                "(slots of replaced versions free up when their in-flight requests finish)")
        return [self._free.pop() for _ in range(count)]

    def release(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))


class Registry:
    """name → current :class:`BundleEntry`; retired entries live on until their refcount reaches 0."""

    def __init__(self, on_free: Callable[[BundleEntry], None]) -> None:
        self._current: dict[str, BundleEntry] = {}
        self._retired: list[BundleEntry] = []
        self._on_free = on_free
        self._generation = 0

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def __contains__(self, name: str) -> bool:
        return name in self._current

    def entries(self) -> list[BundleEntry]:
        return [self._current[name] for name in sorted(self._current)]

    def get(self, name: str) -> BundleEntry:
        entry = self._current.get(name)
        if entry is None:
            loaded = ", ".join(sorted(self._current)) or "none"
            raise BundleNotFoundError(f"bundle {name!r} is not loaded (loaded: {loaded})", param="bundle")
        return entry

    def acquire(self, name: str) -> BundleEntry:
        entry = self.get(name)
        entry.refcount += 1
        return entry

    def release(self, entry: BundleEntry) -> None:
        entry.refcount -= 1
        if entry.retired and entry.refcount == 0:
            self._free(entry)

    def install(self, entry: BundleEntry) -> BundleEntry | None:
        """Make ``entry`` current for its name; the previous entry (returned) is retired."""
        old = self._current.get(entry.name)
        self._current[entry.name] = entry
        if old is not None:
            self._retire(old)
        return old

    def remove(self, name: str) -> BundleEntry:
        entry = self.get(name)
        del self._current[name]
        self._retire(entry)
        return entry

    @property
    def draining(self) -> int:
        """Retired versions still serving in-flight requests."""
        return len(self._retired)

    def _retire(self, entry: BundleEntry) -> None:
        entry.retired = True
        if entry.refcount == 0:
            self._on_free(entry)
        else:
            self._retired.append(entry)

    def _free(self, entry: BundleEntry) -> None:
        if entry in self._retired:
            self._retired.remove(entry)
        self._on_free(entry)
