"""Router protocol and registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cl_service.data.schema import Sample
from cl_service.registry import Registry


@dataclass(frozen=True)
class Route:
    """A routing decision: the chosen expert id, the raw router output, and whether a fallback was used."""

    expert: str
    raw: str
    fallback: bool


class Router(Protocol):
    kind: str

    def route(self, samples: list[Sample]) -> list[Route]:
        """Route each sample to one expert of the current pool."""
        ...


ROUTERS: Registry[type] = Registry("router")
