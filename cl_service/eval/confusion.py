"""Routing confusion matrices: which task's test items a routed method sent to which expert, stage by stage.

Read from the prediction files a run writes (``predictions/<method>/stage-<i>-<task>/<t>.jsonl``: each line's
``metadata.expert`` is the expert the item was routed to), so every finished or resumed run has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cl_service.eval.predictions import read_predictions

NO_EXPERT = "(base)"
"""Column of items routed to no expert (answered by the plain base)."""


def prediction_path(out: Path, method: str, stage: int, tasks: Sequence[str], task: str) -> Path:
    """The prediction file of ``task``'s test items after stage ``stage`` (whose task is ``tasks[stage]``)."""
    return Path(out) / "predictions" / method / f"stage-{stage}-{tasks[stage]}" / f"{task}.jsonl"


def stage_confusion(out: Path, method: str, stage: int, tasks: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{true task: {expert: items routed there}}`` after stage ``stage``, every task of the stream as a row (a
    task not learned yet is routed somewhere too). Raises ``FileNotFoundError`` when a prediction file is missing."""
    out_m: dict[str, dict[str, int]] = {}
    for t in tasks:
        row: dict[str, int] = {}
        for rec in read_predictions(prediction_path(out, method, stage, tasks, t)):
            e = (rec.get("metadata") or {}).get("expert") or NO_EXPERT
            row[e] = row.get(e, 0) + 1
        out_m[t] = row
    return out_m


def confusion_table(conf: dict[str, dict[str, int]], experts: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of a confusion matrix in percent of each true task's items (columns: ``experts``, then
    ``(base)`` when some item went to none)."""
    cols = list(experts) + ([NO_EXPERT] if any(NO_EXPERT in r for r in conf.values()) else [])
    cols += sorted({e for r in conf.values() for e in r} - set(cols))  # an expert outside the pool: shown, not hidden
    rows = []
    for t, r in conf.items():
        n = sum(r.values())
        rows.append([t, n, *[100.0 * r.get(e, 0) / n if n else None for e in cols]])
    return ["true task", "items", *cols], rows
