"""Spec of a built-in procedurally generated benchmark (a stand-in for a paper stream)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from cl_service.data.schema import Sample
from cl_service.registry import Registry

#: make(rng, split, index) -> Sample. ``split`` is "train" or "test"; a non-IID benchmark draws its
#: test split from a shifted distribution (other fonts, sizes, colours, layouts).
MakeSample = Callable[[random.Random, str, int], Sample]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    scorer: str
    description: str
    make: MakeSample


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    tasks: tuple[TaskSpec, ...]
    iid: bool
    summary: str
    seed_key: str = ""
    """The name its random streams derive from (default: ``name``). A renamed benchmark keeps its old one, so it
    still generates the samples, and the tokenizer corpus, that earlier results were measured on."""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def generate(self, split: str, n_per_task: int, seed: int) -> Iterator[Sample]:
        """Yield ``n_per_task`` samples of every task in stream order; deterministic in (seed, task, split)."""
        for task in self.tasks:
            rng = random.Random(_derive_seed(seed, self.seed_key or self.name, task.name, split))
            for i in range(n_per_task):
                yield task.make(rng, split, i)


def _derive_seed(seed: int, *parts: str) -> int:
    h = hashlib.sha256(("/".join([str(seed), *parts])).encode()).digest()
    return int.from_bytes(h[:8], "little")


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")
