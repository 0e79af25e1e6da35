"""What a run folder offers for serving (a :class:`Catalog` snapshot) and the validation of Predict requests.

Plain library code shared by the plain gRPC servicer (``serve/service.py``) and the Ray Serve app
(``on_ray/serve.py``). A catalog is immutable: hot add builds a new one when the run publishes an expert
or a retrained router, and requests already holding the old snapshot finish with it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cl_service.adapters.registry import ADAPTER_META, AdapterError, AdapterRegistry, read_adapter
from cl_service.data.images import BadImage, validate_image
from cl_service.data.schema import Sample
from cl_service.resolved import read_resolved
from cl_service.routers.prompt import Pool
from cl_service.serve.config import LimitsCfg

MAX_IMAGE_PIXELS = 4096 * 4096


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a message for the client (no traceback)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # crosses process boundaries (a Ray Serve replica -> the ingress) intact
        return (type(self), (self.code, self.message))


@dataclass(frozen=True)
class ExpertEntry:
    id: str
    task: str
    description: str
    version: int
    path: Path


@dataclass(frozen=True)
class Catalog:
    """Experts in stream order, the latest usable MLLM router and its pool, and a fingerprint of all of it."""

    run_dir: Path
    tasks: tuple[str, ...]
    experts: tuple[ExpertEntry, ...]
    router_dir: Path | None
    pool: Pool | None
    fingerprint: str
    resolved: dict[str, Any]
    feature_routers: dict[str, tuple[Path, tuple[str, ...]]]
    """Saved feature routers (``routers/<kind>/stage-<i>-<task>/``) of the latest usable stage per kind:
    ``kind -> (folder, experts in pool order)``; exactly the router the offline evaluation used."""
    router_version: int | None = None
    """``version`` of the MLLM router's ``adapter.json`` (+1 with every retrained router published there)."""

    @classmethod
    def load(cls, run_dir: str | Path, verify: bool = True, method: str | None = None,
             stage: int | None = None) -> "Catalog":
        """Scan ``run_dir``: complete experts (checksums verified), and the router of the latest stage whose
        seen tasks all have experts. Raises :class:`AdapterError` when no expert is complete. ``method``: instead,
        that method's adapter of the latest complete stage (or of ``stage``) as the only expert
        (:meth:`stage_adapter`)."""
        run_dir = Path(run_dir).resolve()
        cfg_file = run_dir / "config.resolved.json"
        if not cfg_file.is_file():
            raise AdapterError(f"{run_dir} is not a run results folder (no config.resolved.json)")
        resolved = read_resolved(run_dir)  # base and dataset as paths this process opens
        tasks = tuple(resolved["tasks"])
        found = AdapterRegistry(run_dir / "adapters").scan()
        if method is not None:
            return cls.stage_adapter(run_dir, resolved, found, method, verify, stage)
        experts = []
        for t in tasks:
            info = _published(found, f"expert:{t}", verify)
            if info is None:
                continue
            experts.append(ExpertEntry(info.id, info.task, info.description, info.version, info.path))
        if not experts:
            from cl_service.methods import why_unserved

            raise AdapterError(f"run {run_dir} holds no complete expert adapter"
                               + why_unserved(tuple(resolved.get("config", {}).get("methods", ()))))
        known = {e.task: e for e in experts}
        router_dir, pool, router_version = None, None, None
        for i in range(len(tasks) - 1, 0, -1):
            d = run_dir / "adapters" / "router" / f"stage-{i}-{tasks[i]}"
            seen = tasks[: i + 1]
            if all(t in known for t in seen) and (d / ADAPTER_META).is_file():
                try:
                    router_version = int(read_adapter(d, verify=verify).get("version", 1))
                except AdapterError:
                    continue
                router_dir = d
                pool = Pool(seen, tuple(known[t].description for t in seen))
                break
        feature_routers: dict[str, tuple[Path, tuple[str, ...]]] = {}
        kinds = sorted(p.name for p in (run_dir / "routers").iterdir()) if (run_dir / "routers").is_dir() else []
        for kind in kinds:
            for i in range(len(tasks) - 1, 0, -1):
                meta = run_dir / "routers" / kind / f"stage-{i}-{tasks[i]}" / "router.json"
                if meta.is_file():
                    pool_experts = tuple(json.loads(meta.read_text()).get("experts", ()))
                    if pool_experts and all(t in known for t in pool_experts):
                        feature_routers[kind] = (meta.parent, pool_experts)
                        break
        h = hashlib.sha256()
        for p in [e.path for e in experts] + ([router_dir] if router_dir else []):
            h.update(str(p).encode() + (p / ADAPTER_META).read_bytes())
            h.update(_stats(p))
        for folder, _ in feature_routers.values():
            h.update(str(folder).encode() + (folder / "router.json").read_bytes())
        return cls(run_dir, tasks, tuple(experts), router_dir, pool, h.hexdigest()[:16], resolved, feature_routers,
                   router_version)

    @classmethod
    def stage_adapter(cls, run_dir: Path, resolved: dict[str, Any], found: dict[str, Any], method: str,
                      verify: bool, stage: int | None = None) -> "Catalog":
        """The catalog of a method that answers every task with one adapter per stage (a method declaring
        ``stage_adapter``, e.g. ``sefe``, ``keeplora``: the model merged so far as one peft LoRA): its adapter
        ``<method>:stage-<i>`` of the latest complete stage (of stage ``stage`` when set), as the only expert, named
        by the method. Refused
        (:class:`AdapterError`, naming the method and why) for a method the run did not run, one without such an
        adapter, one whose adapters answer through their own hooks, or before its first (its ``stage``) stage is
        complete."""
        from cl_service.adapters.family import answers_with_hooks, family_of
        from cl_service.methods import METHODS

        tasks = tuple(resolved["tasks"])
        ran = tuple(resolved.get("config", {}).get("methods", ()))
        if method not in ran:
            raise AdapterError(f"run {run_dir} did not run method {method!r}; its methods: {', '.join(ran)}")
        if method not in METHODS or not getattr(METHODS.get(method), "stage_adapter", False):
            why = getattr(METHODS.get(method), "serving", None) if method in METHODS else "unknown to this version"
            raise AdapterError(f"method {method!r} keeps no single adapter per stage to serve with method=; "
                               + (f"it is {why}" if why else "it is served as per-task experts behind the run's "
                                  "router: leave method unset"))
        if stage is not None and stage >= len(tasks):
            raise AdapterError(f"stage {stage} is past the run's {len(tasks)} stages (0 to {len(tasks) - 1})")
        for i in (range(len(tasks) - 1, -1, -1) if stage is None else (stage,)):
            info = _published(found, f"{method}:stage-{i}", verify)
            if info is None:
                continue
            fam = family_of(info.path)
            if answers_with_hooks(fam):
                raise AdapterError(f"method {method!r}'s adapter is {fam.describe(info.path)}: clsvc serve answers "
                                   "peft LoRAs only")
            entry = ExpertEntry(info.id, method, info.description, info.version, info.path)
            h = hashlib.sha256(str(info.path).encode() + (info.path / ADAPTER_META).read_bytes() + _stats(info.path))
            return cls(run_dir, tasks, (entry,), None, None, h.hexdigest()[:16], resolved, {}, None)
        raise AdapterError(f"run {run_dir} holds no complete {method} stage adapter"
                           + (f" of stage {stage} ({tasks[stage]})" if stage is not None else "") + " yet")

    def find(self, name: str) -> ExpertEntry:
        """An expert by task name or adapter id; ``NOT_FOUND`` listing the known ones otherwise."""
        for e in self.experts:
            if name in (e.task, e.id):
                return e
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"unknown expert {_clip(name)}; known experts: {', '.join(e.task for e in self.experts)}")

    @property
    def stage(self) -> int:
        """Index of the last task with a published expert."""
        return max(self.tasks.index(e.task) for e in self.experts)

    def run_setting(self, section: str, key: str, default: Any) -> Any:
        return self.resolved.get("config", {}).get(section, {}).get(key, default)

    def base_settings(self) -> dict[str, Any]:
        """How to load the run's base for serving, as the run evaluated it: its prompt style and dtype
        (``base_dtype`` of ``config.resolved.json``; None: the checkpoint's own)."""
        return {"dtype": self.resolved.get("base_dtype"), "prompt_style": self.run_setting("base", "prompt_style", "auto")}


def _clip(text: str, n: int = 80) -> str:
    """``repr`` of client text for an error message, cut to ``n`` characters (gRPC bounds the message size)."""
    return repr(text) if len(text) <= n else f"{text[:n]!r}... ({len(text)} characters)"


def _stats(folder: Path) -> bytes:
    """Names, sizes and mtimes of a folder's files: a rewritten weight file changes the fingerprint too, so
    hot add verifies it again."""
    out = []
    try:
        for f in sorted(folder.iterdir()):
            st = f.stat()
            out.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:  # swapped out while we looked: the next poll sees the new folder
        out.append("?")
    return ";".join(out).encode()


Limits = LimitsCfg  # the request limits a server checks (``ServeCfg.limits``)

#: Images decoded by request validation in this process (:func:`parse_predict`): what a test counts to prove a
#: refused call (a missing token, an oversized message) cost no decoding.
DECODED = Counter()


def _check_image(i: int, data: bytes, limits: Limits) -> bytes:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not data:
        raise RequestError(bad, f"images[{i}]: empty bytes")
    if len(data) > limits.max_image_bytes:
        raise RequestError(bad, f"images[{i}]: {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # header only: refuse decompression bombs before decoding
            w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise RequestError(bad, f"images[{i}]: {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS}")
        DECODED["images"] += 1
        return validate_image(bytes(data))
    except RequestError:
        raise
    except BadImage as e:
        raise RequestError(bad, f"images[{i}]: not a decodable image ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise RequestError(bad, f"images[{i}]: not a decodable image ({type(e).__name__})") from None


def parse_predict(request: Any, limits: Limits) -> tuple[Sample, int | None]:
    """A validated ``cl.v1.PredictRequest`` as a :class:`Sample` and its ``max_new_tokens`` (None = default).

    Raises :class:`RequestError` (``INVALID_ARGUMENT``) naming the bad field.
    """
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not request.images:
        raise RequestError(bad, "images: at least one image (PNG or JPEG bytes) is required")
    if len(request.images) > limits.max_images:
        raise RequestError(bad, f"images: {len(request.images)} given, at most {limits.max_images} allowed")
    images = [_check_image(i, d, limits) for i, d in enumerate(request.images)]
    if not request.question.strip():
        raise RequestError(bad, "question: must not be empty")
    if len(request.question) > limits.max_question_chars:
        raise RequestError(bad, f"question: {len(request.question)} characters, at most "
                                f"{limits.max_question_chars} allowed")
    n = None
    if request.HasField("max_new_tokens"):
        n = request.max_new_tokens
        if not 1 <= n <= limits.max_new_tokens:
            raise RequestError(bad, f"max_new_tokens: {n} is outside [1, {limits.max_new_tokens}]")
    sample = Sample(task="serve", split="test", id="request", images=images, question=request.question,
                    answers=[""], scorer="exact")
    return sample, n


def check_budget(mllm: Any, sample: Sample, max_new_tokens: int) -> int:
    """Refuse (``INVALID_ARGUMENT``) a request the model cannot take whole: its images' tokens (images x
    ``mllm.tokens_per_image``), the question's tokens and ``max_new_tokens`` answer tokens must fit the model's
    ``max_length``. Checked before a request joins a batch: over the budget, it would fail the whole batched
    model call (or have its question cut silently). Tokenizes the question; decodes no image. Returns the
    prompt's length in tokens (image tokens and the chat template included: what the model reads)."""
    limit, k, n = int(mllm.cfg.max_length), int(mllm.tokens_per_image), len(sample.images)
    question = len(mllm.tokenizer(sample.question, add_special_tokens=False).input_ids)
    try:
        ids = mllm.encode(sample, with_target=False)[0]
    except ValueError:  # the images alone leave no room
        ids = []
    if ids and ids.count(mllm.image_token_id) != n * k:  # the question's text holds the image placeholder
        token = mllm.tokenizer.convert_ids_to_tokens(mllm.image_token_id)
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"question: must not contain the image placeholder {token!r} (images go in 'images')")
    prompt = len(ids)
    need = max(prompt, 1 + n * k + question) + max_new_tokens
    if prompt == 0 or need > limit:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request too long for the model: {n} image(s) x {k} image tokens + {question} question "
                           f"tokens + {max_new_tokens} answer tokens = {need}, over its max_length of {limit}; "
                           f"send fewer images, a shorter question or a smaller max_new_tokens")
    return prompt


def admit(engine: Any, sample: Sample, max_new_tokens: int | None) -> RequestError | int:
    """:func:`check_budget` for a request of an :class:`~cl_service.engine.Engine` (None =
    ``engine.max_new_tokens``): its error, or its prompt's length in tokens when it fits."""
    try:
        return check_budget(engine.mllm, sample, max_new_tokens or engine.max_new_tokens)
    except RequestError as e:
        return e


def _published(found: dict[str, Any], adapter_id: str, verify: bool) -> Any:
    """The registry's entry of ``adapter_id`` once complete (checksums checked when ``verify``); None while it is
    missing, being written or corrupt: not published."""
    info = found.get(adapter_id)
    if info is None:
        return None
    try:
        read_adapter(info.path, verify=verify)
    except AdapterError:
        return None
    return info
