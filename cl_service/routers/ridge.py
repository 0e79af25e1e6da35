"""Closed-form ridge router: a linear map from base-model question features to one-hot expert targets.

The critique of MR-LoRA's MLLM router (see the benchmark notes) is that the tasks are so separable that
a closed-form ridge regression on frozen features routes as well at a fraction of the cost. Features are
:meth:`Engine.question_features` (decoder state pooled over the question's tokens next to the mean CLIP
state), standardised with the fit data's mean/std; one linear solve, no gradient steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cl_service.data.schema import Sample
from cl_service.routers.base import ROUTERS, Route, best_scores


@ROUTERS.register("ridge")
@dataclass
class RidgeRouter:
    kind = "ridge"
    experts: tuple[str, ...]
    mean: np.ndarray     # [D] feature mean of the fit data
    scale: np.ndarray    # [D] feature std of the fit data
    weight: np.ndarray   # [D + 1, E] (last row: bias)
    engine: object = None

    @classmethod
    def fit(cls, engine, per_task: dict[str, list[Sample]], lam: float = 10.0) -> "RidgeRouter":
        """``per_task`` maps expert id -> a few training samples of its task; ``lam`` is the L2 penalty."""
        if not per_task:
            raise ValueError("the ridge router needs at least one expert")
        xs, ys = [], []
        for k, samples in enumerate(per_task.values()):
            if not samples:
                raise ValueError("the ridge router needs at least one sample per task")
            f = np.asarray(engine.question_features(samples), dtype=np.float64)
            xs.append(f)
            ys.append(np.full(len(f), k))
        X = np.concatenate(xs)
        y = np.concatenate(ys)
        mean, scale = X.mean(0), X.std(0) + 1e-6
        Z = np.hstack([(X - mean) / scale, np.ones((len(X), 1))])
        Y = np.eye(len(per_task))[y]
        reg = lam * np.eye(Z.shape[1])
        reg[-1, -1] = 0.0  # no penalty on the bias
        W = np.linalg.solve(Z.T @ Z + reg, Z.T @ Y)
        return cls(tuple(per_task), mean, scale, W, engine)

    def scores(self, samples: list[Sample]) -> np.ndarray:
        f = np.asarray(self.engine.question_features(samples), dtype=np.float64)
        z = np.hstack([(f - self.mean) / self.scale, np.ones((len(f), 1))])
        return z @ self.weight

    def route(self, samples: list[Sample]) -> list[Route]:
        if not samples:
            return []
        return best_scores(self.experts, self.scores(samples))

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild the router with :meth:`from_state` (saved by :mod:`cl_service.routers.store`)."""
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight}

    @classmethod
    def from_state(cls, experts: tuple[str, ...], arrays: dict[str, np.ndarray], engine=None) -> "RidgeRouter":
        return cls(tuple(experts), arrays["mean"], arrays["scale"], arrays["weight"], engine)
