"""The versioned Arrow schema of one sample.

Schema version 1 (one row per sample):

| column    | Arrow type      | meaning                                                            |
|-----------|-----------------|--------------------------------------------------------------------|
| task      | string          | task name, e.g. ``RS`` (stream order lives in the manifest)        |
| split     | string          | ``train`` or ``test`` (router/replay subsets keep their own name) |
| id        | string          | sample id, unique within (task, split)                             |
| images    | list<binary>    | encoded image bytes (PNG/JPEG), one or more per sample             |
| question  | string          | the user's question, without the ``<image>`` placeholder           |
| answers   | list<string>    | reference answers; most tasks have exactly one                     |
| scorer    | string          | name of the scorer in :data:`cl_service.eval.scorers.SCORERS`      |
| metadata  | string          | JSON object with task-specific fields (``answer_type``, ``type`` …)|

Images are kept encoded so shards stay small and a reader decodes lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa

SCHEMA_VERSION = 1

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("scorer", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ],
    metadata={b"cl_service.schema_version": str(SCHEMA_VERSION).encode()},
)


@dataclass
class Sample:
    """One multimodal sample. ``images`` hold encoded bytes; ``answers`` is never empty."""

    task: str
    split: str
    id: str
    images: list[bytes]
    question: str
    answers: list[str]
    scorer: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The first reference answer (the training target)."""
        return self.answers[0]

    def to_row(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "split": self.split,
            "id": str(self.id),
            "images": list(self.images),
            "question": self.question,
            "answers": [str(a) for a in self.answers],
            "scorer": self.scorer,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Sample":
        return cls(
            task=row["task"],
            split=row["split"],
            id=row["id"],
            images=list(row["images"]),
            question=row["question"],
            answers=list(row["answers"]),
            scorer=row["scorer"],
            metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        )


def to_record_batch(samples: Iterable[Sample]) -> pa.RecordBatch:
    """Pack samples into one record batch of :data:`SAMPLE_SCHEMA`."""
    rows = [s.to_row() for s in samples]
    cols = {name: [r[name] for r in rows] for name in SAMPLE_SCHEMA.names}
    return pa.RecordBatch.from_pydict(cols, schema=SAMPLE_SCHEMA)


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> Iterator[Sample]:
    """Yield samples from a batch or table with the sample schema."""
    for row in batch.to_pylist():
        yield Sample.from_row(row)
