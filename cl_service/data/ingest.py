"""Ingest data in the official MLLM-CL release layout into Arrow shards.

Layout read (per task ``T`` under ``--root``)::

    T/images/...            image files
    T/train.json            list of LLaVA conversation records
                            {id, image, conversations: [{from: human, value: "<image>\\n…"}, {from: gpt, value}]}
                            ``image`` may be a list (multi-image); every (human, gpt) pair is one sample
    T/test.json             list of {question_id, image, text, answer, ...}; ``answer`` may be a list;
                            other fields (answer_type, type, task, ...) go to the metadata column
    *Router*.json, *replay*.json at the root (optional): conversation records, ingested as task
                            ``_router`` / ``_replay`` with the file stem as split; not part of the stream.

Image paths are resolved against ``T/images/``, then ``T/``, then the root. A missing or corrupt image,
a malformed record or an empty task raises :class:`IngestError` naming file and record, unless
``skip_bad`` is set, in which case the record is skipped and counted in the manifest.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from cl_service.data.images import BadImage, validate_image
from cl_service.data.schema import Sample
from cl_service.data.shards import ShardWriter
from cl_service.data.tasks import task_info

IMAGE_TOKEN = "<image>"
_ROUTER = re.compile(r"router", re.I)
_REPLAY = re.compile(r"replay", re.I)


class IngestError(ValueError):
    """A record that cannot be ingested; the message names file and record."""


class _BadRecord(Exception):
    pass


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text ({e})") from None
    except RecursionError:
        raise IngestError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, list):
        raise IngestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _clean_question(text: str) -> str:
    return re.sub(r"\s*<image>\s*", "\n", text).strip()


class _ImageResolver:
    def __init__(self, root: Path, task_dir: Path | None) -> None:
        self.bases = ([task_dir / "images", task_dir] if task_dir else []) + [root]
        self._cache: dict[str, bytes] = {}

    def __call__(self, rel: Any) -> bytes:
        if not isinstance(rel, str) or not rel:
            raise _BadRecord(f"image field {rel!r} is not a path")
        if rel in self._cache:
            return self._cache[rel]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _BadRecord(f"image path {rel!r} must be relative to the task's images folder")
        for base in self.bases:
            p = base / rel
            try:
                if not p.is_file():
                    continue
                data = validate_image(p.read_bytes())
            except BadImage as e:
                raise _BadRecord(f"image {rel!r} ({p}): {e}") from None
            except (OSError, ValueError) as e:  # a name too long, a NUL byte, unreadable: not a usable path
                raise _BadRecord(f"image {_short(rel)}: cannot be read ({type(e).__name__}: {_short(str(e))})"
                                 ) from None
            else:
                if len(self._cache) < 256:  # router/replay files reuse images of the tasks
                    self._cache[rel] = data
                return data
        raise _BadRecord(f"image {rel!r} not found under {', '.join(str(b) for b in self.bases)}")


def _short(text: str, n: int = 120) -> str:
    return repr(text) if len(text) <= n else f"{text[:n]!r}... ({len(text)} characters)"


def _images(rec: dict, resolve: _ImageResolver) -> list[bytes]:
    img = rec.get("image")
    if img is None:
        raise _BadRecord("record has no 'image' field")
    paths = img if isinstance(img, list) else [img]
    if not paths:
        raise _BadRecord("record has an empty image list")
    return [resolve(p) for p in paths]


def _from_conversation(rec: Any, task: str, split: str, scorer: str, resolve: _ImageResolver) -> list[Sample]:
    if not isinstance(rec, dict):
        raise _BadRecord(f"record is a {type(rec).__name__}, not an object")
    if "id" not in rec:
        raise _BadRecord("record has no 'id'")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise _BadRecord("'conversations' must be a list of at least one human/gpt pair")
    images = _images(rec, resolve)
    extra = {k: v for k, v in rec.items() if k not in ("id", "image", "conversations", "answers")}
    # Our export keeps extra reference answers of a train sample under "answers" (not in the release).
    more = rec.get("answers") if isinstance(rec.get("answers"), list) else None
    out = []
    for k in range(0, len(conv) - 1, 2):
        q, a = conv[k], conv[k + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)) or q.get("from") != "human" or a.get("from") != "gpt":
            raise _BadRecord(f"conversation turn {k} is not a human/gpt pair")
        if not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
            raise _BadRecord(f"conversation turn {k} has a non-string value")
        question, answer = _clean_question(q["value"]), a["value"].strip()
        if not question or not answer:
            raise _BadRecord(f"conversation turn {k} has an empty question or answer")
        sid = str(rec["id"]) if k == 0 else f"{rec['id']}#{k // 2}"
        answers = [answer] + [str(x) for x in (more or [])[1:]] if k == 0 else [answer]
        out.append(Sample(task, split, sid, images, question, answers, scorer, dict(extra)))
    return out


def _from_test(rec: Any, task: str, scorer: str, resolve: _ImageResolver) -> list[Sample]:
    if not isinstance(rec, dict):
        raise _BadRecord(f"record is a {type(rec).__name__}, not an object")
    for key in ("question_id", "text", "answer"):
        if key not in rec:
            raise _BadRecord(f"record has no {key!r}")
    ans = rec["answer"]
    answers = [str(a) for a in ans] if isinstance(ans, list) else [str(ans)]
    if not answers or not isinstance(rec["text"], str) or not rec["text"].strip():
        raise _BadRecord("empty question text or answer list")
    images = _images(rec, resolve)
    extra = {k: v for k, v in rec.items() if k not in ("question_id", "image", "text", "answer")}
    return [Sample(task, "test", str(rec["question_id"]), images, _clean_question(rec["text"]), answers, scorer, extra)]


def _records(path: Path, convert: Callable[[Any], list[Sample]], writer: ShardWriter, task: str, split: str,
             skip_bad: bool) -> Iterator[Sample]:
    records = _load_json_list(path)
    for i, rec in enumerate(records):
        rid = rec.get("question_id", rec.get("id", "?")) if isinstance(rec, dict) else "?"
        try:
            samples = [_unicode_ok(s) for s in convert(rec)]
        except _BadRecord as e:
            msg = f"{path} record {i} (id={rid}): {e}"
            if not skip_bad:
                raise IngestError(msg + " (use --skip-bad to skip bad records and count them)") from None
            writer.skip(task, split, msg)
            continue
        yield from samples


def _unicode_ok(s: Sample) -> Sample:
    """JSON may carry lone surrogates (``"\\ud800"``): text the shards (UTF-8) cannot hold is a bad record."""
    for name, text in (("id", s.id), ("question", s.question), *(("answer", a) for a in s.answers)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRecord(f"{name} is not valid Unicode (a lone surrogate)") from None
    return s


def ingest(
    root: str | Path,
    tasks: list[str],
    out: str | Path,
    scorers: dict[str, str] | None = None,
    skip_bad: bool = False,
    shard_size: int = 512,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Ingest ``tasks`` (in stream order) from ``root`` into a shard dataset at ``out``.

    Returns the manifest. ``progress`` is called with the number of samples written so far.
    """
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"--root {root} is not a folder")
    if not tasks:
        raise IngestError("no tasks given (--tasks T1,T2,...)")
    if len(set(tasks)) != len(tasks):
        raise IngestError(f"duplicate task in --tasks {tasks}")
    scorers = dict(scorers or {})
    unknown = set(scorers) - set(tasks)
    if unknown:
        raise IngestError(f"--scorer names tasks not in --tasks: {sorted(unknown)}")
    for t in tasks:
        if not (root / t).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise IngestError(f"task folder {root / t} not found; folders under root: {found}")
    decl = []
    for t in tasks:
        info = task_info(t)
        decl.append({"name": t, "scorer": scorers.get(t, info.scorer), "description": info.description})
    extras = sorted(p for p in root.glob("*.json") if _ROUTER.search(p.name) or _REPLAY.search(p.name))
    for p in extras:
        name = "_router" if _ROUTER.search(p.name) else "_replay"
        if name not in [d["name"] for d in decl]:
            decl.append({"name": name, "scorer": "exact", "description": f"{name[1:]} files of the release"})
    t0 = time.perf_counter()
    n = 0
    info = {"source": {"layout": "mllm-cl", "root": str(root.resolve())}, "stream": list(tasks)}
    with ShardWriter(out, decl, shard_size=shard_size, info=info, overwrite=overwrite) as w:
        for d in decl[: len(tasks)]:
            t, scorer = d["name"], d["scorer"]
            resolve = _ImageResolver(root, root / t)
            files = {"train": root / t / "train.json", "test": root / t / "test.json"}
            if not any(f.is_file() for f in files.values()):
                raise IngestError(f"task {t}: neither {files['train']} nor {files['test']} exists")
            before = n
            for split, path in files.items():
                if not path.is_file():
                    continue
                conv = ((lambda r, t=t, s=scorer, res=resolve: _from_conversation(r, t, "train", s, res))
                        if split == "train" else (lambda r, t=t, s=scorer, res=resolve: _from_test(r, t, s, res)))
                for sample in _records(path, conv, w, t, split, skip_bad):
                    w.add(sample)
                    n += 1
                    if progress:
                        progress(n)
            if n == before:
                raise IngestError(f"task {t}: no usable records in {', '.join(str(f) for f in files.values())}")
        resolve = _ImageResolver(root, None)
        for p in extras:
            name = "_router" if _ROUTER.search(p.name) else "_replay"
            split = p.stem
            conv = lambda r, name=name, split=split: _from_conversation(r, name, split, "exact", resolve)  # noqa: E731
            for sample in _records(p, conv, w, name, split, skip_bad):
                w.add(sample)
                n += 1
        w.info["ingest_seconds"] = round(time.perf_counter() - t0, 3)
        manifest = w.close()
    return manifest
