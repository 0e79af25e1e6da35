"""One (method, stage) evaluation unit of a continual-learning run, and the state an evaluating process keeps.

A unit is one row of a method's accuracy matrix: after stage ``i``'s training, the method answers the test
items of every task of the stream. :func:`evaluate_stage` computes it and returns the stage record and the
prediction records; :func:`write_stage` (the run's driver) puts them into the results folder. A
:class:`StageEvaluator` is what one evaluating process holds for the whole run — the base loaded once in an
:class:`~cl_service.engine.Engine` with its memo on, the test items, the feature routers' training-sample
cache, each method's ``ctx.extra`` — whether that process is the driver (:class:`LocalEvaluator`) or a Ray
actor (:mod:`cl_service.on_ray.evaluate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cl_service._atomic import write_folder
from cl_service.adapters.registry import adapter_digest
from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset, atomic_write_text
from cl_service.eval.predictions import prediction_record, write_predictions
from cl_service.eval.scorers import SCORERS
from cl_service.methods import METHODS
from cl_service.methods.base import StageContext
from cl_service.train.job import choose, choose_with_copies


@dataclass(frozen=True)
class EvalSetup:
    """What every evaluating process needs to know about the run; picklable (sent once to each Ray actor)."""

    cfg: Any                    # the RunCfg
    out: str                    # the results folder, absolute (adapters are read from it)
    base_path: str              # the base checkpoint, absolute
    data_path: str              # the shard dataset, absolute
    tasks: tuple[str, ...]      # the stream, in order


@dataclass
class StageResult:
    """One evaluated (method, stage) unit."""

    record: dict[str, Any]
    """The stage record (``stages/<method>/stage-<i>-<task>.json``): row, router accuracy and timing, adapters."""
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Test task -> its prediction records, in test order (``predictions/<method>/stage-<i>-<task>/<t>.jsonl``)."""
    folders: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Folders the unit produced (a feature router, ``routers/<kind>/stage-<i>-<task>``): path relative to the
    run folder -> {file name: bytes}. The evaluator may run on another node, so the driver writes them."""
    task_adapters: dict[str, dict[str, str]] = field(default_factory=dict)
    """Test task -> the adapters its answers read ({path relative to the run folder: digest}): what lets the next
    stage carry an entry over (:func:`evaluate_stage`'s ``previous``) only while those adapters are unchanged."""


def rel_path(p: Path, out: Path) -> str:
    """Adapter folders are recorded relative to the run folder, so a copied run folder stays valid."""
    try:
        return str(p.resolve().relative_to(out))
    except ValueError:
        return str(p)


def stage_record_path(out: Path, method: str, stage: int, task: str) -> Path:
    return out / "stages" / method / f"stage-{stage}-{task}.json"


def unit_inputs(cfg: Any, method: Any, base_digest: str | None, data_digest: str) -> dict[str, Any]:
    """What a (method, stage) unit's answers depend on besides its adapters (which its record lists by digest):
    the base and the dataset by content, the test choice (``data.test_limit``, ``seed``) and the settings that
    change answers: the base's dtype and prompt style, where it runs (``eval.use_gpu``: the GPU path fuses
    kernels), ``eval.max_new_tokens``; for the MLLM router ``router.max_new_tokens``, for the feature routers
    (fit during evaluation) ``router.samples_per_task`` and ``router.augment``. Not: ``eval.batch_size``,
    ``eval.threads`` and the other placement settings, nor what training settings change (the adapters' keys do).
    Stored in the record as ``inputs``; JSON values only."""
    from cl_service.models.placement import resolve_base_dtype

    d: dict[str, Any] = {"base": base_digest, "data": data_digest, "test_limit": cfg.data.test_limit,
                         "seed": cfg.seed, "base_dtype": resolve_base_dtype(cfg), "prompt_style": cfg.base.prompt_style,
                         "gpu": eval_uses_gpu(cfg), "max_new_tokens": cfg.eval.max_new_tokens}
    kind = getattr(method, "router_kind", None) if getattr(method, "routed", False) else None
    if kind == "mllm":
        d["router_max_new_tokens"] = cfg.router.max_new_tokens
    elif kind:
        d["router_samples_per_task"], d["router_augment"] = cfg.router.samples_per_task, cfg.router.augment
    return d


def changed_inputs(path: Path, inputs: dict[str, Any]) -> list[str]:
    """The ``inputs`` the record at ``path`` holds otherwise, as ``"key old -> new"`` for a log line; empty when
    there is no record."""
    try:
        old = json.loads(path.read_text()).get("inputs")
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return ["no inputs recorded"]
    return [f"{k} {old.get(k)} -> {v}" for k, v in json.loads(json.dumps(inputs)).items() if old.get(k, "?") != v]


def load_stage_record(path: Path, out: Path, tasks: list[str],
                      inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A finished evaluation record, if it evaluated the same task list (a stream extended with more tasks
    re-evaluates its finished stages on the new ones; their adapters are reused), with the same ``inputs``
    (:func:`unit_inputs`; None: not checked), and its adapters are unchanged since it was written."""
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("tasks", tasks) != tasks or len(rec.get("row", [])) != len(tasks):
        return None
    if inputs is not None and rec.get("inputs") != json.loads(json.dumps(inputs)):
        return None
    for folder, digest in rec.get("adapters", {}).items():
        if adapter_digest(out / folder) != digest:
            return None
    return rec


def score(samples: Sequence[Sample], answers) -> float:
    """Mean score in percent of ``answers`` against the samples' references (each sample's own scorer)."""
    total = 0.0
    for s, a in zip(samples, answers):
        total += SCORERS.get(s.scorer)(a.text, s.answers, s.question, s.metadata)
    return 100.0 * total / max(1, len(samples))


def evaluate_stage(method: Any, ctx: StageContext, tests: dict[str, list[Sample]], train_s: float,
                   previous: StageResult | None = None) -> StageResult:
    """Evaluate ``method`` after stage ``ctx.stage`` on the test items of every task of the stream.

    ``ctx.engine`` answers (its adapters-used set is reset per task: the record lists the adapters this unit
    read, with their digests, so a resumed run knows when to recompute it). ``train_s`` is the stage's
    training time, recorded alongside. Stages a method does not evaluate (``joint`` before the last) give
    a row of ``None`` and no predictions.

    ``previous``: this method's unit of stage ``ctx.stage - 1`` over the same test items, when the caller still
    holds it. Entries the method declares unchanged (its optional ``unchanged(ctx, task)``: ``oracle`` on every
    task but the new one, ``zero_shot`` on all) are then carried over instead of answered again, as long as the
    adapters they read are unchanged: row, predictions (relabelled with this stage's model id) and adapters
    are those a full evaluation gives (``tests/unit/eval/test_stage_carry.py``), and a stage costs the new
    task's items instead of every task's. The record counts the items answered (``items_answered``) and names
    the carried tasks (``carried``).
    """
    engine, tasks, out = ctx.engine, ctx.tasks, Path(ctx.run_dir)
    name, task, T = method.name, ctx.task, len(ctx.tasks)
    engine.reset_used()
    folders: dict[str, dict[str, bytes]] = {}

    def emit_folder(folder: Path, files: dict[str, bytes]) -> None:
        rel = rel_path(Path(folder), out)
        if Path(rel).is_absolute():
            raise ValueError(f"{name} produced {folder}, outside the run folder {out}")
        folders[rel] = files

    ctx.extra["emit_folder"] = emit_folder
    t1 = time.perf_counter()
    ctx.extra["router_stats"] = {"seconds": 0.0, "requests": 0}
    row: list[float | None] = [None] * T
    routed: dict[str, float] = {}
    fallbacks = 0
    predictions: dict[str, list[dict[str, Any]]] = {}
    task_adapters: dict[str, dict[str, str]] = {}
    carried: list[str] = []
    answered = 0
    if method.evaluates(ctx):
        carry = _carriable(method, ctx, previous)
        for j, t in enumerate(tasks):
            if t in carry:
                row[j], task_adapters[t] = previous.record["row"][j], previous.task_adapters[t]
                if t in previous.record["router_accuracy"]:
                    routed[t] = previous.record["router_accuracy"][t]
                fallbacks += sum(bool(p["metadata"].get("fallback")) for p in previous.predictions[t])
                predictions[t] = [prediction_record(p["question_id"], p["prompt"], p["text"], f"{name}@{task}",
                                                    p["metadata"]) for p in previous.predictions[t]]
                carried.append(t)
                continue
            engine.reset_used()
            answers = method.predict(ctx, tests[t])
            answered += len(tests[t])
            task_adapters[t] = {rel_path(p, out): adapter_digest(p) for p in engine.used_adapters()}
            row[j] = score(tests[t], answers)
            if method.routed:
                routed[t] = 100.0 * sum(a.expert == t for a in answers) / max(1, len(answers))
                fallbacks += sum(a.fallback for a in answers)
            predictions[t] = [prediction_record(s.id, s.question, a.text, f"{name}@{task}",
                                                {"expert": a.expert, "router_raw": a.router_raw,
                                                 "fallback": a.fallback})
                              for s, a in zip(tests[t], answers)]
    rs = ctx.extra["router_stats"]
    adapters = {rel: d for t in tasks for rel, d in task_adapters.get(t, {}).items()}
    rec = {"method": name, "stage": ctx.stage, "task": task, "tasks": list(tasks), "row": row,
           "router_accuracy": routed, "router_seconds": rs["seconds"], "router_requests": rs["requests"],
           "fallbacks": fallbacks, "train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t1, 3),
           "items_answered": answered, "carried": carried,
           "adapters": dict(sorted(adapters.items())), "device": str(engine.mllm.device)}
    engine.reset_used()
    ctx.extra.pop("emit_folder", None)
    return StageResult(rec, predictions, folders, task_adapters)


def _carriable(method: Any, ctx: StageContext, previous: StageResult | None) -> set[str]:
    """The tasks whose entry of ``previous`` (stage ``ctx.stage - 1``) this stage may carry over: the method
    declares them unchanged, and every adapter the entry read still has the digest it had then."""
    unchanged = getattr(method, "unchanged", None)
    if unchanged is None or previous is None or ctx.stage == 0:
        return set()
    rec = previous.record
    if (rec.get("method") != method.name or rec.get("stage") != ctx.stage - 1 or rec.get("tasks") != list(ctx.tasks)
            or any(v is None for v in rec.get("row", [None]))):
        return set()
    out, digests = set(), {}
    for t in ctx.tasks:
        if t not in previous.task_adapters or t not in previous.predictions or not unchanged(ctx, t):
            continue
        adapters = previous.task_adapters[t]
        for rel in adapters:
            if rel not in digests:
                try:
                    digests[rel] = adapter_digest(Path(ctx.run_dir) / rel)
                except OSError:
                    digests[rel] = None
        if all(digests[rel] == d for rel, d in adapters.items()):
            out.add(t)
    return out


def write_stage(out: Path, result: StageResult) -> None:
    """Write a unit's folders (feature routers, each atomically), its predictions, then its stage record (last:
    the record marks the unit done)."""
    rec = result.record
    for rel, files in result.folders.items():
        write_folder(out / rel, files)
    name, stage, task = rec["method"], rec["stage"], rec["task"]
    for t, lines in result.predictions.items():
        write_predictions(out / "predictions" / name / f"stage-{stage}-{task}" / f"{t}.jsonl", lines)
    atomic_write_text(stage_record_path(out, name, stage, task), json.dumps(rec, indent=2))


def eval_uses_gpu(cfg: Any) -> bool:
    """``eval.use_gpu``, or ``ray.use_gpu`` when it is unset."""
    return bool(cfg.ray.use_gpu if cfg.eval.use_gpu is None else cfg.eval.use_gpu)


def default_engine(base_path: str, cfg: Any, device: str | None = None):
    """The engine of an evaluating process: the base in the run's dtype
    (:func:`cl_service.models.placement.resolve_base_dtype`) on ``device`` (None: CPU). On a GPU it answers
    through the stacked multi-adapter path and the fused kernels (the serving engine's fast path, within one
    bf16 step of peft's); the CPU keeps peft's own path, bit for bit what earlier runs computed."""
    import torch

    from cl_service.engine import Engine
    from cl_service.models.mllm import load_mllm
    from cl_service.models.placement import resolve_base_dtype

    gpu = device is not None and torch.device(device).type == "cuda"
    return Engine(load_mllm(base_path, dtype=resolve_base_dtype(cfg), device=device,
                            prompt_style=cfg.base.prompt_style), cfg, fused_lora=gpu)


class StageEvaluator:
    """What one evaluating process holds across the stages of a run; :meth:`evaluate` computes one unit.

    Args:
        setup: the run (:class:`EvalSetup`).
        engine: the engine to answer with (memo gets enabled); None: built with ``engine_factory``.
        engine_factory: ``(base_path, cfg) -> Engine`` when ``engine`` is None; default :func:`default_engine`
            on ``device``.
        device: where the default engine's base goes (``"cuda"``); None = CPU.
        carry: hand each method's previous unit to the next (:func:`evaluate_stage`'s ``previous``), so entries
            the method declares unchanged are carried over; False answers every entry (the memo still
            serves repeated answers).
    """

    def __init__(self, setup: EvalSetup, engine: Any = None, engine_factory: Callable | None = None,
                 device: str | None = None, carry: bool = True) -> None:
        cfg = setup.cfg
        self.setup = setup
        self.out = Path(setup.out)
        self.tasks = list(setup.tasks)
        self.ds = ShardDataset(setup.data_path)
        self.descriptions = {t: self.ds.task_meta(t)["description"] for t in self.tasks}
        if engine is None:
            engine = (engine_factory(setup.base_path, cfg) if engine_factory is not None
                      else default_engine(setup.base_path, cfg, device))
        self.engine = engine
        self.engine.enable_memo()  # the same expert answers the same test item at every stage: compute it once
        self.tests = {t: choose(self.ds.samples(t, "test"), cfg.data.test_limit, cfg.seed) for t in self.tasks}
        self._train_cache: dict[tuple, list] = {}
        self._methods: dict[str, Any] = {}
        self._extras: dict[str, dict[str, Any]] = {}
        self.carry = carry
        self._last: dict[str, StageResult] = {}  # each method's latest unit: what the next stage may carry over

    def train_samples(self, task: str, limit: int, seed: int, augment: int = 0) -> list[Sample]:
        """A seeded choice of a task's training samples, with ``augment`` look-jittered copies of each;
        computed once per process (every feature router of every stage asks for the same ones)."""
        key = (task, limit, seed, augment)
        if key not in self._train_cache:
            self._train_cache[key] = choose_with_copies(self.ds, task, "train", limit, seed, augment)
        return self._train_cache[key]

    def evaluate(self, method: str, stage: int, train_s: float = 0.0,
                 previous: StageResult | None = None) -> StageResult:
        """Unit (``method``, ``stage``); adapters changed on disk since the last unit are reloaded. ``previous``:
        the method's unit of the stage before, from whoever holds it (a Ray evaluator's driver, when its actors
        restart between stages); default: this process's own (with ``carry``)."""
        if method not in self._methods:
            self._methods[method] = METHODS.get(method)()
            self._extras[method] = {"base_path": self.setup.base_path, "dataset": self.setup.data_path,
                                    "train_samples": self.train_samples}
        self.engine.forget_missing()
        ctx = StageContext(stage, self.tasks, self.descriptions, self.out, self.setup.cfg, self.engine,
                           self._extras[method])
        previous = (previous or self._last.get(method)) if self.carry else None
        result = evaluate_stage(self._methods[method], ctx, self.tests, train_s, previous)
        self._last[method] = result
        return result


class LocalEvaluator:
    """Evaluator backend of :func:`cl_service.run.run_stream` in the calling process: one
    :class:`StageEvaluator`, built at the first unit (a run whose units are all finished never loads the
    base). Its base goes on ``cuda`` when evaluation uses GPUs (:func:`eval_uses_gpu`) and CUDA is available."""

    def __init__(self, engine_factory: Callable | None = None) -> None:
        self.engine_factory = engine_factory
        self.setup: EvalSetup | None = None
        self._ev: StageEvaluator | None = None

    def start(self, setup: EvalSetup) -> None:
        self.setup, self._ev = setup, None

    def evaluate(self, stage: int, methods: Sequence[str], train_s: float) -> Iterator[tuple[str, StageResult]]:
        if not methods:
            return
        if self._ev is None:
            assert self.setup is not None, "start() first"
            self._ev = StageEvaluator(self.setup, engine_factory=self.engine_factory, device=self._device())
        for name in methods:
            yield name, self._ev.evaluate(name, stage, train_s)

    def _device(self) -> str | None:
        from cl_service.models.placement import eval_device

        return eval_device(self.setup.cfg)

    def close(self) -> None:
        self._ev = None
