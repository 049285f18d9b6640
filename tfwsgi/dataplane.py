"""The protocol-agnostic core: resolve a servable, then answer from the cache or run the model."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import metrics
from .batching import DEADLINE_MESSAGE, Batcher
from .cache import Outcome, Policy, PredictionCache, Tensors
from .errors import DeadlineExceeded
from .manager import ModelManager

DEFAULT_SIGNATURE = "serving_default"


class DataPlane:
    """What every transport calls: predict, classify and regress on decoded tensors."""

    def __init__(self, manager: ModelManager, cache: PredictionCache,
                 batcher: Batcher | None = None) -> None:
        self.manager = manager
        self.cache = cache
        self.batcher = batcher

    def servable(self, name: str, version: int | None, label: str | None) -> Any:
        return self.manager.servable(name, version, label)

    def _run(self, servable: Any, signature: str, method: str, inputs: Mapping[str, np.ndarray],
             compute: Callable[[], Tensors], policy: Policy,
             deadline: float | None) -> tuple[Tensors, Outcome]:
        def counted() -> Tensors:
            out = compute()
            metrics.MODEL_RUNS.labels(servable.name, str(servable.version), signature, method).inc()
            return out

        answer = self.cache.get_or_compute(servable.name, servable.version, signature, method,
                                           inputs, counted, policy)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(DEADLINE_MESSAGE)  # too late: the connection layer answered
        return answer

    def predict(self, servable: Any, signature: Any, inputs: Mapping[str, np.ndarray],
                policy: Policy = Policy.NORMAL, deadline: float | None = None) -> tuple[Tensors, Outcome]:
        batcher = self.batcher
        if batcher is None:
            def compute() -> Tensors:
                return signature.run(inputs)
        else:
            key = (servable.name, servable.version, signature.name)

            def compute() -> Tensors:
                return batcher.run(key, inputs, signature.run, deadline)
        return self._run(servable, signature.name, "predict", inputs, compute, policy, deadline)

    def classify(self, servable: Any, signature_name: str, examples: np.ndarray,
                 policy: Policy = Policy.NORMAL, deadline: float | None = None) -> tuple[Tensors, Outcome]:
        name = signature_name or DEFAULT_SIGNATURE

        def compute() -> Tensors:
            classes, scores = servable.classify(name, examples)
            out = {}
            if classes is not None:
                out["classes"] = classes
            if scores is not None:
                out["scores"] = scores
            return out

        return self._run(servable, name, "classify", {"inputs": examples}, compute, policy, deadline)

    def regress(self, servable: Any, signature_name: str, examples: np.ndarray,
                policy: Policy = Policy.NORMAL, deadline: float | None = None) -> tuple[Tensors, Outcome]:
        name = signature_name or DEFAULT_SIGNATURE
        return self._run(servable, name, "regress", {"inputs": examples},
                         lambda: {"outputs": servable.regress(name, examples)}, policy, deadline)
