"""Read and write the reference formats: test.json annotations and JSONL prediction files.

A prediction line is ``{question_id, prompt, text, answer_id, model_id, metadata}`` as the MLLM-CL
reference code writes it (``text`` is the model's answer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def read_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a test.json (a JSON list of ``{question_id, image, text, answer, ...}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotations file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "question_id" not in rec or "answer" not in rec:
            raise ValueError(f"{path} record {i}: needs 'question_id' and 'answer'")
    return data


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL prediction file; blank lines are ignored; a bad line is an error naming its number."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file {path} not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "question_id" not in rec or "text" not in rec:
            raise ValueError(f"{path} line {n}: a prediction needs 'question_id' and 'text'")
        out.append(rec)
    return out


def prediction_record(question_id: str, prompt: str, text: str, model_id: str,
                      metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the reference prediction format."""
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": f"{model_id}:{question_id}",
            "model_id": model_id, "metadata": metadata or {}}


def write_predictions(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write JSONL atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
