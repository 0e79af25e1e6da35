"""Export a shard dataset to the official MLLM-CL release layout (the inverse of :mod:`ingest`).

Per stream task ``T``: ``T/images/<split>/<id>_<k>.<png|jpg>``, ``T/train.json`` (LLaVA conversation
records, extra metadata fields kept as record keys; a train sample with several reference answers keeps
them under ``answers``) and ``T/test.json`` (``{question_id, image, text, answer, ...metadata}``; a single
answer is written as a string, several as a list, as in the release). The export is written to a staging
folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from cl_service._atomic import replace_dir
from cl_service.data.images import image_format
from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_RESERVED = {"id", "image", "conversations", "question_id", "text", "answer", "answers"}


def _write_images(s: Sample, task_dir: Path, split: str) -> list[str]:
    rels = []
    for k, data in enumerate(s.images):
        rel = f"{split}/{_SAFE.sub('_', s.id)}_{k}.{image_format(data)}"
        path = task_dir / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rels.append(rel)
    return rels


def _meta(s: Sample) -> dict[str, Any]:
    return {k: v for k, v in s.metadata.items() if k not in _RESERVED}


def export_mllm_cl(dataset: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Write ``dataset`` in the official layout under ``out``. Returns samples written per task."""
    ds = ShardDataset(dataset)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    counts: dict[str, int] = {}
    try:
        for task in ds.tasks:
            task_dir = stage / task
            task_dir.mkdir(parents=True)
            train, test = [], []
            for s in ds.iter_samples(task):
                rels = _write_images(s, task_dir, s.split)
                image: Any = rels[0] if len(rels) == 1 else rels
                if s.split == "test":
                    rec = {"question_id": s.id, "image": image, "text": s.question,
                           "answer": s.answers[0] if len(s.answers) == 1 else list(s.answers), **_meta(s)}
                    test.append(rec)
                else:
                    human = "<image>\n" * len(rels) + s.question
                    rec = {"id": s.id, "image": image,
                           "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": s.answers[0]}],
                           **_meta(s)}
                    if len(s.answers) > 1:
                        rec["answers"] = list(s.answers)
                    train.append(rec)
            for name, recs in (("train.json", train), ("test.json", test)):
                if recs:
                    (task_dir / name).write_text(json.dumps(recs, indent=1))
            counts[task] = len(train) + len(test)
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return counts
