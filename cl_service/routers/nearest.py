"""Training-free nearest-neighbour router: every fit sample is a labelled key, and a request goes to the
expert of its most similar key (cosine).

Why neighbours and not class means (the ``prototype`` router): a task mixes question templates (acl-glyphs'
OCR asks for the word, its first letter or its length), so its mean lies between them, and "How many
letters are in the word?" lands nearer VP's "How many circles are there?" mean than OCR's own (measured on
that stream when it was acl-mini).

Features are :meth:`Engine.routing_features`: the question through the base decoder *alone* (centred on the
fit data's mean, then unit length) next to the mean CLIP state of the images (unit length), so that the
question and the image weigh the same and a shifted test look moves only the image half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cl_service.data.schema import Sample
from cl_service.routers.base import ROUTERS, Route, best_scores


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def _embed(f: np.ndarray, text_mean: np.ndarray) -> np.ndarray:
    """``[n, H_text + H_vision]`` routing features -> the compared vectors: the question half centred on
    ``text_mean``, each half unit length."""
    d = len(text_mean)
    return np.hstack([_unit(f[:, :d] - text_mean), _unit(f[:, d:])]).astype(np.float32)


@ROUTERS.register("knn")
@dataclass
class NearestRouter:
    kind = "knn"
    experts: tuple[str, ...]
    keys: np.ndarray       # [N, D] embedded fit samples (see embed)
    labels: np.ndarray     # [N] index into experts
    text_mean: np.ndarray  # [H_text] centre of the question half; its length splits a feature row
    engine: object = None

    @classmethod
    def fit(cls, engine, per_task: dict[str, list[Sample]]) -> "NearestRouter":
        """``per_task`` maps expert id -> a few training samples of its task."""
        if not per_task:
            raise ValueError("the knn router needs at least one expert")
        feats, labels = [], []
        for k, samples in enumerate(per_task.values()):
            if not samples:
                raise ValueError("the knn router needs at least one sample per task")
            f = np.asarray(engine.routing_features(samples), dtype=np.float32)
            feats.append(f)
            labels.append(np.full(len(f), k, dtype=np.int64))
        X = np.concatenate(feats)
        text_mean = X[:, :int(engine.text_dim)].mean(0)
        return cls(tuple(per_task), _embed(X, text_mean), np.concatenate(labels), text_mean, engine)

    def embed(self, f: np.ndarray) -> np.ndarray:
        """Raw routing features -> the compared vectors (see :func:`_embed`)."""
        return _embed(f, self.text_mean)

    def scores(self, samples: list[Sample]) -> np.ndarray:
        """``[n, E]``: per expert, the similarity of its nearest key (in [-2, 2])."""
        sim = self.embed(np.asarray(self.engine.routing_features(samples), dtype=np.float32)) @ self.keys.T
        out = np.full((len(samples), len(self.experts)), -np.inf, dtype=np.float32)
        for k in range(len(self.experts)):
            mine = self.labels == k
            if mine.any():
                out[:, k] = sim[:, mine].max(axis=1)
        return out

    def route(self, samples: list[Sample]) -> list[Route]:
        if not samples:
            return []
        return best_scores(self.experts, self.scores(samples))

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild the router with :meth:`from_state` (saved by :mod:`cl_service.routers.store`)."""
        return {"keys": self.keys, "labels": self.labels, "text_mean": self.text_mean}

    @classmethod
    def from_state(cls, experts: tuple[str, ...], arrays: dict[str, np.ndarray], engine=None) -> "NearestRouter":
        return cls(tuple(experts), arrays["keys"], arrays["labels"], arrays["text_mean"], engine)
