"""The serving engine: bundles in multi-LoRA slots, micro-batched shared forwards, uncertainty, monitoring.

Nothing here imports FastAPI; the HTTP layer talks to :class:`Engine`.
"""

from service.engine.base import Engine
from service.engine.predictors import PREDICTORS, Predictor
from service.engine.types import AnswerOptions, AnswerResult, BundleMonitor, BundleStatus, EngineObserver

__all__ = ["PREDICTORS", "AnswerOptions", "AnswerResult", "BundleMonitor", "BundleStatus", "Engine",
           "EngineObserver", "Predictor"]
