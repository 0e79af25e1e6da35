"""The task orders of a study: the benchmark's own order first, then rows of cyclic Latin squares.

A cyclic Latin square over T tasks (row r: ``base[(r + j) % T]`` for j = 0..T-1) puts every task at every
position exactly once over its T rows, so orders taken from it balance positions: with K <= T orders, no task
holds a position twice. Rows are taken in a seeded order (the own order, row 0 of the first square, always
first); past T orders the next square is built over a seeded permutation of the tasks, skipping rows already
taken. Or the user lists the orders in a file: one per line, task names separated by spaces or commas (``#``
starts a comment).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence


class OrderError(ValueError):
    """An order that is not a permutation of the stream's tasks, or an impossible request."""


def latin_orders(tasks: Sequence[str], k: int, seed: int = 0) -> list[tuple[str, ...]]:
    """``k`` distinct orders of ``tasks``: ``tasks`` itself first, then cyclic Latin-square rows in a seeded order.

    Raises :class:`OrderError` when ``k`` < 1 or more orders are asked for than there are permutations."""
    tasks = tuple(tasks)
    if k < 1:
        raise OrderError(f"a study needs at least one order, got {k}")
    total = 1
    for n in range(2, len(tasks) + 1):
        total *= n
    if k > total:
        raise OrderError(f"{k} orders asked for, but {len(tasks)} tasks have only {total}")
    rng = random.Random(f"orders/{seed}")
    out: list[tuple[str, ...]] = [tasks]
    base = tasks
    while len(out) < k:
        rows = [tuple(base[(r + j) % len(base)] for j in range(len(base))) for r in range(len(base))]
        rng.shuffle(rows)
        out += [r for r in rows if r not in out][: k - len(out)]
        nxt = list(tasks)
        rng.shuffle(nxt)
        base = tuple(nxt)
    return out


def check_order(order: Sequence[str], tasks: Sequence[str], where: str = "order") -> tuple[str, ...]:
    """``order`` as a tuple when it is a permutation of ``tasks``; else :class:`OrderError` naming what differs."""
    order = tuple(order)
    if len(set(order)) != len(order):
        dup = sorted({t for t in order if order.count(t) > 1})
        raise OrderError(f"{where} {list(order)} names {dup} more than once")
    missing, extra = sorted(set(tasks) - set(order)), sorted(set(order) - set(tasks))
    if missing or extra:
        raise OrderError(f"{where} {list(order)} is not a permutation of the stream's tasks {list(tasks)}"
                         + (f": missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    return order


def read_orders(path: str | Path, tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """The orders listed in ``path`` (one per line), each checked against ``tasks``; duplicates are errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OrderError(f"orders file {path} not found") from None
    orders: list[tuple[str, ...]] = []
    for n, line in enumerate(text.splitlines(), 1):
        names = [t for t in re.split(r"[\s,]+", line.split("#", 1)[0].strip()) if t]
        if not names:
            continue
        order = check_order(names, tasks, f"{path} line {n}:")
        if order in orders:
            raise OrderError(f"{path} line {n}: order {list(order)} is listed twice")
        orders.append(order)
    if not orders:
        raise OrderError(f"orders file {path} lists no order")
    return orders


def study_orders(spec: str, tasks: Sequence[str], seed: int = 0) -> list[tuple[str, ...]]:
    """``--orders``: a number K (:func:`latin_orders`) or the path of an orders file (:func:`read_orders`)."""
    spec = str(spec).strip()
    if spec.isdigit():
        return latin_orders(tasks, int(spec), seed)
    if not Path(spec).exists():
        raise OrderError(f"--orders {spec!r} is neither a number of orders nor an orders file")
    return read_orders(spec, tasks)


def parse_seeds(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """``--seeds``: a number N (seeds 0..N-1) or a comma-separated list (``0,3,7``; ``5,`` is seed 5 alone)."""
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        seeds = tuple(int(s) for s in spec)
    elif "," not in spec:
        if not spec.strip().isdigit() or int(spec) < 1:
            raise ValueError(f"--seeds {spec!r}: a number of seeds (>= 1) or a comma-separated list of seeds")
        seeds = tuple(range(int(spec)))
    else:
        try:
            seeds = tuple(int(s) for s in spec.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--seeds {spec!r}: seeds are integers") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {spec!r}: at least one seed, each >= 0 and listed once")
    return seeds
