"""Router protocol and registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

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


class SharedVision:
    """The engine as a feature router sees it, with the batch's CLIP states already computed (a server
    computes them once per request, for the router and the expert alike)."""

    def __init__(self, engine: Any, vision_states: Any) -> None:
        self.engine, self.vision_states = engine, vision_states

    def features(self, samples: list[Sample]):
        return self.engine.features(samples, self.vision_states)

    def routing_features(self, samples: list[Sample]):
        return self.engine.routing_features(samples, self.vision_states)


#: Feature routers whose features can start from the batch's CLIP states (``ridge`` reads the question
#: after the image tokens, a full prefill of its own).
SHARES_VISION = ("prototype", "knn")


def over_states(router: Any, engine: Any, vision_states: Any) -> Any:
    """``router`` reading its features over ``vision_states`` (``[N_img, k, H]`` of the samples it will
    route, in order) when its kind can; else ``router`` unchanged."""
    if vision_states is None or getattr(router, "kind", None) not in SHARES_VISION:
        return router
    return dataclasses.replace(router, engine=SharedVision(engine, vision_states))


ROUTERS: Registry[type] = Registry("router")
