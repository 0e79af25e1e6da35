"""Helpers shared by the procedural task generators: sample assembly and answer formatting."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np

from cl_service.data.schema import Sample
from cl_service.data.synth.base import MakeSample, TaskSpec
from cl_service.data.synth.render import encode_png, np_rng
from cl_service.data.tasks import task_info

LETTERS = "ABCD"

#: One question type: (numpy rng, split) -> (image, question, answers, metadata).
QuestionMaker = Callable[[np.random.Generator, str], tuple[np.ndarray, str, list[str], dict[str, Any]]]


def pick(nrng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One element of ``items``, uniformly."""
    return items[int(nrng.integers(len(items)))]


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def options_text(options: Sequence[str]) -> str:
    """``"A. x B. y C. z D. w"``: the option list appended to multiple-choice questions."""
    return " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def task_maker(task: str, scorer: str, types: Sequence[QuestionMaker]) -> MakeSample:
    """Build ``make(rng, split, index)`` that cycles through question ``types`` by index.

    Cycling (rather than drawing) keeps types exactly balanced in every prefix, so a 20-sample
    router or replay subset sees all of them. Each question type samples its answer uniformly
    first and renders the image to match, which keeps answers balanced within a type.
    """

    def make(rng: random.Random, split: str, index: int) -> Sample:
        nrng = np_rng(rng)
        qtype = index % len(types)
        img, question, answers, meta = types[qtype](nrng, split)
        meta = {"qtype": types[qtype].__name__.lstrip("_"), **meta}
        return Sample(
            task=task,
            split=split,
            id=f"{task.lower()}-{split}-{index:06d}",
            images=[encode_png(img)],
            question=question,
            answers=list(answers),
            scorer=scorer,
            metadata=meta,
        )

    return make


def paper_task(name: str, types: Sequence[QuestionMaker]) -> TaskSpec:
    """A :class:`TaskSpec` for one of the paper's tasks, scorer and description from ``tasks.py``."""
    info = task_info(name)
    make = task_maker(name, info.scorer, types)
    return TaskSpec(name=name, scorer=info.scorer, description=info.description, make=make)
