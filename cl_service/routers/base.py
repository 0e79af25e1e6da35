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


def best_scores(experts: tuple[str, ...], scores) -> list[Route]:
    """One route per row of ``scores`` (``[n, len(experts)]``): the highest-scoring expert, its score as raw."""
    return [Route(experts[int(k)], f"{experts[int(k)]}:{row[int(k)]:.3f}", False)
            for k, row in zip(scores.argmax(axis=1), scores)]


ROUTERS: Registry[type] = Registry("router")
