"""Batched multi-LoRA inference shared by evaluation and serving."""

from cl_service.engine.continuous import ContinuousBatcher, KVCacheFull, QueueFull, ResourceExhausted
from cl_service.engine.engine import Engine
from cl_service.engine.mixture import Mixture
from cl_service.engine.pipeline import Pipeline

__all__ = ["ContinuousBatcher", "Engine", "KVCacheFull", "Mixture", "Pipeline", "QueueFull", "ResourceExhausted"]
