"""The MLLM router's prompt (the structure of the paper's Figure 3) and the parsing of its output."""

from __future__ import annotations

import re
from dataclasses import dataclass
from string import ascii_uppercase

from cl_service.data.schema import Sample


@dataclass(frozen=True)
class Pool:
    """The lettered expert pool: ``experts[i]`` is expert id, ``descriptions[i]`` its one-line description.

    Letters follow the pool's order (A, B, ...), which is the order experts were added.
    """

    experts: tuple[str, ...]
    descriptions: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.descriptions):
            raise ValueError("one description per expert")
        if len(self.experts) > len(ascii_uppercase):
            raise ValueError(f"at most {len(ascii_uppercase)} experts per pool")

    @property
    def letters(self) -> str:
        return ascii_uppercase[: len(self.experts)]

    def letter_of(self, expert: str) -> str:
        return self.letters[self.experts.index(expert)]


def router_prompt(pool: Pool, question: str) -> str:
    """The router's question text (the image goes with it as usual).

    Structure: a system line naming the K experts' domains; instructions to answer with the letter
    only and not to answer the question; the lettered pool; the user's question; a closing line.
    """
    domains = ", ".join(d.split(":")[0] for d in pool.descriptions)
    lines = [f"You are a router choosing among {len(pool.experts)} experts ({domains}).",
             "Pick the expert best suited to the image and question below. Answer only with the expert's letter; "
             "do not answer the question."]
    lines += [f"{letter}. {desc}" for letter, desc in zip(pool.letters, pool.descriptions)]
    lines += [f"Question: {question}", "The letter of the most suitable expert is:"]
    return "\n".join(lines)


def router_sample(pool: Pool, sample: Sample, expert: str | None) -> Sample:
    """Wrap ``sample`` as a router item; ``expert`` (its task's expert) gives the training target letter."""
    answers = [pool.letter_of(expert)] if expert is not None else ["?"]
    return Sample(sample.task, sample.split, sample.id, sample.images, router_prompt(pool, sample.question),
                  answers, "exact", {"router": True})


_LETTER = re.compile(r"\b([A-Z])\b")


def parse_choice(output: str, pool: Pool) -> str | None:
    """The first valid expert letter in ``output`` (a standalone capital letter of the pool), or None."""
    for m in _LETTER.finditer(output.strip()):
        if m.group(1) in pool.letters:
            return pool.experts[pool.letters.index(m.group(1))]
    s = output.strip()
    if s and s[0] in pool.letters:  # "A." / "Aexpert": the model glued the letter to text
        return pool.experts[pool.letters.index(s[0])]
    return None
