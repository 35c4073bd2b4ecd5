"""Domain errors shared by training and serving; none of them knows about HTTP."""

from __future__ import annotations


class UqserveError(Exception):
    """Base class of every error uqserve raises on purpose."""


class BaseModelError(UqserveError):
    """The base model is missing, unreadable, or not a supported local checkpoint."""


class BundleError(UqserveError):
    """A bundle is malformed; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str] | str, *, bundle: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"bundle {bundle!r}: " if bundle else ""
        super().__init__(where + "; ".join(self.problems))


class IncompatibleBundleError(BundleError):
    """A well-formed bundle that does not fit the loaded base model (hash, layers, shapes)."""


class InvalidQuestionError(UqserveError, ValueError):
    """A question cannot be scored: too few or too many choices, empty or unencodable text, too long.

    ``param`` names the offending field when known (``question``, ``context``, ``choices.1``); ``code`` is a
    stable machine-readable reason (``blank_text``, ``invalid_text``, ``duplicate_choices``, …)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_question") -> None:
        super().__init__(message)
        self.param = param
        self.code = code
