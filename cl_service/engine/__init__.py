"""Batched multi-LoRA inference shared by evaluation and serving."""

from cl_service.engine.engine import Engine

__all__ = ["Engine"]
