"""Soft routing weights from per-task feature means (HiDe-LLaVA's anchors, DISCO's prototypes): cosine
similarities of each request to each task's means, and their softmax at a temperature. Per request: row ``b`` of
every result belongs to request ``b`` alone (DISCO's reference code scores the batch's mean feature instead).

Features are the base's routing features (:meth:`cl_service.engine.engine.Engine.routing_features`), split into the
question half (``[:, :text_dim]``) and the image half.
"""

from __future__ import annotations

import numpy as np


def cosines(x: np.ndarray, means: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``[B, T]`` float64: the cosine of each row of ``x [B, D]`` with each row of ``means [T, D]`` (as torch's
    ``cosine_similarity``: the dot product over ``max(|x| |m|, eps)``, so a zero vector scores 0)."""
    x, means = np.asarray(x, dtype=np.float64), np.asarray(means, dtype=np.float64)
    if x.ndim != 2 or means.ndim != 2 or x.shape[1] != means.shape[1]:
        raise ValueError(f"features {x.shape} and means {means.shape} are not [B, D] and [T, D]")
    norms = np.linalg.norm(x, axis=1, keepdims=True) * np.linalg.norm(means, axis=1)[None, :]
    return (x @ means.T) / np.maximum(norms, eps)


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``[B, T]`` float64: the softmax of ``scores / temperature`` over each row (max-shifted: no overflow)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def anchor_weights(text: np.ndarray, image: np.ndarray, text_means: np.ndarray, image_means: np.ndarray,
                   temperature: float) -> np.ndarray:
    """HiDe-LLaVA's expert weights ``[B, T]``: ``softmax(s / temperature)`` with ``s_t`` the mean of the image's and
    the question's cosine to task ``t``'s image and text anchor (one anchor per task: the reference's max over a
    task's anchors is over one)."""
    return softmax((cosines(image, image_means) + cosines(text, text_means)) / 2, temperature)


def prototype_weights(text: np.ndarray, text_means: np.ndarray, temperature: float) -> np.ndarray:
    """DISCO's subspace weights ``[B, T]``: ``softmax(cos(question, text prototype_t) / temperature)`` (text only,
    as the reference's inference: its image term is commented out)."""
    return softmax(cosines(text, text_means), temperature)
