"""Training-free prototype router: nearest class mean (cosine) of pooled base-model features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cl_service.data.schema import Sample
from cl_service.routers.base import ROUTERS, Route, best_scores


@ROUTERS.register("prototype")
@dataclass
class PrototypeRouter:
    kind = "prototype"
    experts: tuple[str, ...]
    means: np.ndarray  # [E, H], unit-normalised
    engine: object = None

    @classmethod
    def fit(cls, engine, per_task: dict[str, list[Sample]]) -> "PrototypeRouter":
        """``per_task`` maps expert id -> a few training samples of its task."""
        means = []
        for samples in per_task.values():
            if not samples:
                raise ValueError("the prototype router needs at least one sample per task")
            f = engine.features(samples)
            means.append(f.mean(axis=0))
        m = np.stack(means)
        m /= np.linalg.norm(m, axis=1, keepdims=True) + 1e-8
        return cls(tuple(per_task), m, engine)

    def scores(self, samples: list[Sample]) -> np.ndarray:
        f = self.engine.features(samples)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)
        return f @ self.means.T

    def route(self, samples: list[Sample]) -> list[Route]:
        if not samples:
            return []
        return best_scores(self.experts, self.scores(samples))

    def state(self) -> dict[str, np.ndarray]:
        return {"means": self.means}

    @classmethod
    def from_state(cls, experts: tuple[str, ...], arrays: dict[str, np.ndarray], engine=None) -> "PrototypeRouter":
        return cls(tuple(experts), arrays["means"], engine)
