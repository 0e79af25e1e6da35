"""The MLLM router's prompt (the structure of the paper's Figure 3) and the parsing of its output.

Experts are labelled by capital letters in pool order: ``A`` .. ``Z`` for pools of up to 26 experts (the
paper's prompt, unchanged), and codes of a fixed length ``k`` beyond that (``AA``, ``AB``, .. ``ZZ`` for up to
676 experts, ``AAA`` .. for more). Every label of a pool has the same length on purpose: no label is then a
prefix of another (``A`` of ``AB``), so a parsed output is never ambiguous, generation needs the same number
of letters for every expert, and the router's fallback compares scores of equal-length strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from string import ascii_uppercase

from cl_service.data.schema import Sample


@dataclass(frozen=True)
class Pool:
    """The lettered expert pool: ``experts[i]`` is expert id, ``descriptions[i]`` its one-line description.

    Labels follow the pool's order (A, B, ... or AA, AB, ... past 26 experts), which is the order experts
    were added.
    """

    experts: tuple[str, ...]
    descriptions: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.experts) != len(self.descriptions):
            raise ValueError("one description per expert")

    @property
    def label_len(self) -> int:
        """Letters per label: 1 up to 26 experts, the fewest that label them all beyond."""
        k, n = 1, len(ascii_uppercase)
        while n < len(self.experts):
            k, n = k + 1, n * len(ascii_uppercase)
        return k

    @property
    def letters(self) -> tuple[str, ...]:
        """Each expert's label, in pool order (``("A", "B", ...)``; ``("AA", "AB", ...)`` past 26 experts)."""
        return tuple("".join(c) for _, c in zip(self.experts, product(ascii_uppercase, repeat=self.label_len)))

    def letter_of(self, expert: str) -> str:
        return self.letters[self.experts.index(expert)]


def router_prompt(pool: Pool, question: str) -> str:
    """The router's question text (the image goes with it as usual).

    Structure: a system line naming the K experts' domains; instructions to answer with the letter
    only and not to answer the question; the lettered pool; the user's question; a closing line. Pools past
    26 experts ask for the expert's ``k``-letter code instead of its letter.
    """
    domains = ", ".join(d.split(":")[0] for d in pool.descriptions)
    what = "letter" if pool.label_len == 1 else f"{pool.label_len}-letter code"
    lines = [f"You are a router choosing among {len(pool.experts)} experts ({domains}).",
             f"Pick the expert best suited to the image and question below. Answer only with the expert's {what}; "
             "do not answer the question."]
    lines += [f"{letter}. {desc}" for letter, desc in zip(pool.letters, pool.descriptions)]
    lines += [f"Question: {question}", f"The {what} of the most suitable expert is:"]
    return "\n".join(lines)


def router_sample(pool: Pool, sample: Sample, expert: str | None) -> Sample:
    """Wrap ``sample`` as a router item; ``expert`` (its task's expert) gives the training target label."""
    answers = [pool.letter_of(expert)] if expert is not None else ["?"]
    return Sample(sample.task, sample.split, sample.id, sample.images, router_prompt(pool, sample.question),
                  answers, "exact", {"router": True})


def parse_choice(output: str, pool: Pool) -> str | None:
    """The first valid expert label in ``output`` (a standalone run of exactly ``pool.label_len`` capitals that
    is a label of the pool), else a label glued to text at the start (``"Bexpert"``, ``"ABexpert"``), or None.

    Letters split by spaces do not join (``"A B"`` is no label of a two-letter pool): the router's fallback
    then scores the labels instead of guessing.
    """
    k = pool.label_len
    labels = pool.letters
    for m in re.finditer(r"\b([A-Z]{%d})\b" % k, output.strip()):
        if m.group(1) in labels:
            return pool.experts[labels.index(m.group(1))]
    s = output.strip()
    if len(s) >= k and s[:k] in labels:  # "A." / "Aexpert": the model glued the label to text
        return pool.experts[labels.index(s[:k])]
    return None
