"""The versioned Arrow schema of one sample.

Schema version 2 (one row per sample):

| column    | Arrow type      | meaning                                                            |
|-----------|-----------------|--------------------------------------------------------------------|
| task      | string          | task name, e.g. ``RS`` (stream order lives in the manifest)        |
| split     | string          | ``train`` or ``test`` (router/replay subsets keep their own name) |
| id        | string          | sample id, unique within (task, split)                             |
| images    | list<struct<bytes: binary, path: string>> | encoded image bytes (PNG/JPEG), one or more per sample; ``path`` is null |
| question  | string          | the user's question, without the ``<image>`` placeholder           |
| answers   | list<string>    | reference answers; most tasks have exactly one                     |
| scorer    | string          | name of the scorer in :data:`cl_service.eval.scorers.SCORERS`      |
| metadata  | string          | JSON object with task-specific fields (``answer_type``, ``type`` …)|

Images are kept encoded so shards stay small and a reader decodes lazily. Version 2 stores each image as
the struct of the Hugging Face ``Image`` feature, and the schema carries that feature in its ``huggingface``
metadata, so ``datasets`` decodes the column to PIL images by itself. Version 1 (:data:`SAMPLE_SCHEMA_V1`,
Arrow IPC shards) held ``images`` as ``list<binary>``; such datasets are still read, to the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets' Image storage


def _fields(images: pa.Field) -> list[pa.Field]:
    return [pa.field("task", pa.string(), nullable=False), pa.field("split", pa.string(), nullable=False),
            pa.field("id", pa.string(), nullable=False), images,
            pa.field("question", pa.string(), nullable=False),
            pa.field("answers", pa.list_(pa.string()), nullable=False),
            pa.field("scorer", pa.string(), nullable=False), pa.field("metadata", pa.string(), nullable=False)]


_STR = {"dtype": "string", "_type": "Value"}
# The features ``datasets`` reads from the schema ("Sequence": the name every datasets version knows). It uses a
# column's feature only where the field matches the feature's own Arrow field, nullability included: hence the
# nullable ``images`` field.
_HF_FEATURES = {"task": _STR, "split": _STR, "id": _STR, "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
                "question": _STR, "answers": {"feature": _STR, "_type": "Sequence"}, "scorer": _STR, "metadata": _STR}

SAMPLE_SCHEMA = pa.schema(
    _fields(pa.field("images", pa.list_(IMAGE_TYPE), nullable=True)),
    metadata={b"cl_service.schema_version": str(SCHEMA_VERSION).encode(),
              b"huggingface": json.dumps({"info": {"features": _HF_FEATURES}}).encode()},
)

SAMPLE_SCHEMA_V1 = pa.schema(
    _fields(pa.field("images", pa.list_(pa.binary()), nullable=False)),
    metadata={b"cl_service.schema_version": b"1"},
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
            "images": [{"bytes": b, "path": None} for b in self.images],
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
            images=[im["bytes"] if isinstance(im, dict) else im for im in row["images"]],  # v2 struct, v1 bytes
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
