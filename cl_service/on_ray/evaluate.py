"""Evaluation on Ray: evaluator actors that each hold the base once and compute (method, stage) units.

Each actor wraps one :class:`cl_service.eval.stage.StageEvaluator` (the base loaded once in an ``Engine``
with its memo on, the test items, the feature routers' training-sample cache), on its GPU when evaluation
uses GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``cuda`` is the actor's GPU). The driver sends every unit of
a stage to the actors — method ``k`` of ``cfg.methods`` always to actor ``k mod n``, so a method finds its
earlier answers in that actor's memo — and writes the records as they come back.

The actors stay up for the whole run when the cluster can hold them next to one Ray Train worker group;
otherwise (e.g. one GPU, or a 2-CPU machine) they are stopped after each stage's evaluation, so that the next
stage's training can be scheduled, and started again for the next evaluation.

No filesystem needs to be shared with the driver's results folder: an actor on another node than the driver's
evaluates against its own *mirror* of the run's ``adapters/`` (same layout, under the node's temp folder, so
paths relative to the run folder and stage records are unchanged). Before a stage's units go out the driver
sends each mirroring actor the adapter folders it lacks or holds with another ``adapter.json`` digest, one
folder at a time through the object store (:mod:`cl_service.adapters.transfer`), and drops the ones the run no
longer has. Actors never write the results folder: the feature routers they fit come back with the unit
(:attr:`StageResult.folders`) and the driver writes them.

Faults: Ray restarts a crashed actor once (``max_restarts=1``), perhaps on another node, with an empty mirror.
Every unit names the life of the actor it was sent to, and an actor refuses a unit meant for an earlier life
(:class:`Restarted`); the driver then asks the actor where it is now, syncs its mirror again and sends the unit
again. The driver waits as long as the actors make progress (each forward pass of an actor's base reports it,
:mod:`cl_service.on_ray._stall`), up to ``ray.stall_timeout_s`` of silence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ray

from cl_service.adapters import transfer
from cl_service.eval.stage import EvalSetup, LocalEvaluator, StageEvaluator, StageResult, eval_uses_gpu
from cl_service.on_ray._stall import Beat, Beats, Watch

#: The longest the driver waits for a unit before it looks at the actors' progress again.
_POLL_S = 2.0


class Restarted(RuntimeError):
    """A unit sent to an evaluator actor's earlier life: the actor was restarted since, and its mirror may lack the
    adapters the driver sent before. The driver syncs the mirror and sends the unit again."""


class _EvalActor:
    """One evaluating process: builds the base once, then answers units (see :class:`StageEvaluator`).

    On another node than the driver's (or with ``mirror``) it reads adapters from its own mirror of the run's
    ``adapters/``, kept in sync by the driver (:meth:`inventory`, :meth:`receive`, :meth:`drop`). The mirror's
    folder is named after the run and the actor's index, so an actor restarted on the same node (after a
    crash, or at the next stage when actors stop between stages) finds what it already received."""

    def __init__(self, setup: EvalSetup, device: str | None, threads: int, driver_node: str, index: int,
                 mirror: bool = False, beat: Beat | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.life = os.urandom(8).hex()  # this start of the actor: Ray restarts a crashed one, perhaps elsewhere
        self.mirror: Path | None = None
        if mirror or ray.get_runtime_context().get_node_id() != driver_node:
            tag = hashlib.sha256(f"{setup.out}|{driver_node}".encode()).hexdigest()[:12]
            self.mirror = (Path(tempfile.gettempdir()) / f"clsvc-mirror-{tag}-{index}").resolve()
            (self.mirror / "adapters").mkdir(parents=True, exist_ok=True)
            setup = dataclasses.replace(setup, out=str(self.mirror))
        self.ev = StageEvaluator(setup, device=device)
        if beat is not None:  # every forward pass of the base (a prefill, a decode step) is progress
            self.ev.engine.mllm.model.get_input_embeddings().register_forward_hook(lambda *_: beat())

    def ready(self) -> tuple[str, str | None, str]:
        """The base's device, the mirror's folder (None: reads the results folder itself), and this life's id."""
        return str(self.ev.engine.mllm.device), None if self.mirror is None else str(self.mirror), self.life

    def inventory(self) -> dict[str, str]:
        return transfer.inventory(self.mirror / "adapters")

    def receive(self, rel: str, files: dict[str, bytes]) -> None:
        transfer.materialise(files, self.mirror / "adapters" / rel)

    def drop(self, rels: list[str]) -> None:
        transfer.drop(self.mirror / "adapters", rels)

    def remove_mirror(self) -> None:
        if self.mirror is not None:
            shutil.rmtree(self.mirror, ignore_errors=True)

    def evaluate(self, life: str, method: str, stage: int, train_s: float,
                 previous: StageResult | None = None) -> StageResult:
        if life != self.life:
            raise Restarted(f"unit ({method}, stage {stage}) was sent to an earlier start of this evaluator")
        return self.ev.evaluate(method, stage, train_s, previous)


def num_evaluators(cfg: Any, cluster: dict[str, float]) -> int:
    """``eval.num_workers``, with None (auto) = one per GPU of ``cluster`` (``ray.cluster_resources()``) when
    evaluation uses GPUs, else 0 (evaluate in the driver)."""
    if cfg.eval.num_workers is not None:
        return int(cfg.eval.num_workers)
    return int(cluster.get("GPU", 0)) if eval_uses_gpu(cfg) else 0


def _needs(cfg: Any, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Resources of one Ray Train worker group and of ``n`` evaluator actors."""
    gpus_per_worker = float(getattr(cfg.ray, "gpus_per_worker", 1.0))
    train = {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker,
             "GPU": cfg.ray.num_workers * gpus_per_worker if cfg.ray.use_gpu else 0.0}
    evals = {"CPU": n * cfg.eval.cpus_per_worker, "GPU": n * cfg.eval.num_gpus if eval_uses_gpu(cfg) else 0.0}
    return train, evals


def _fits(need: dict[str, float], cluster: dict[str, float]) -> bool:
    return all(v <= cluster.get(k, 0.0) + 1e-9 for k, v in need.items())


def _say(need: dict[str, float]) -> str:
    return " and ".join(f"{v:g} {k}s" for k, v in need.items() if v) or "nothing"


class RayEvaluator:
    """Evaluator backend of :func:`cl_service.run.run_stream` over ``n`` evaluator actors.

    Args:
        cfg: the ``RunCfg`` (``eval.*``, ``ray.*``: resources; ``ray.stall_timeout_s`` bounds every wait).
        num_workers: actors; default :func:`num_evaluators` of the cluster (must be >= 1 here).
        env: environment variables of the actors.
        log: progress lines.
        mirror: every actor evaluates against a mirror, as one on another node than the driver's does.
    """

    def __init__(self, cfg: Any, num_workers: int | None = None, env: dict[str, str] | None = None,
                 log: Callable[[str], None] = print, mirror: bool = False) -> None:
        cluster = ray.cluster_resources()
        n = num_evaluators(cfg, cluster) if num_workers is None else num_workers
        if n < 1:
            raise ValueError("RayEvaluator needs at least one actor (eval.num_workers=0 evaluates in the driver)")
        train, evals = _needs(cfg, n)
        if not _fits(evals, cluster):
            raise ValueError(f"{n} evaluator actor(s) need {_say(evals)}; the cluster has "
                             f"{_say({k: cluster.get(k, 0.0) for k in evals})} (see eval.num_workers, "
                             f"eval.cpus_per_worker, eval.num_gpus)")
        self.cfg, self.n, self.env, self.log = cfg, n, env or {}, log
        self.stall_s = float(cfg.ray.stall_timeout_s)
        #: keep the actors for the whole run, or stop them after each stage (training needs their resources)
        self.resident = _fits({k: train[k] + evals[k] for k in train}, cluster)
        self._why = (f"the cluster's {_say({k: cluster.get(k, 0.0) for k in train})} cannot hold a training "
                     f"group ({_say(train)}) and {n} evaluator(s) ({_say(evals)}) at once")
        self.setup: EvalSetup | None = None
        self.actors: list[Any] = []
        self._started = False
        self.force_mirror = mirror
        self.driver_node = ray.get_runtime_context().get_node_id()
        self.mirrors: list[str | None] = []  # per actor: its mirror folder, or None
        self.lives: list[str] = []  # per actor: the id of its current start (it changes when Ray restarts it)
        self.restarts = 0  # units sent again to a restarted actor (for tests and logs)
        self.beats: Any = None
        #: (stage, adapter folder relative to adapters/, actors it went to): what the mirrors were sent
        self.sent: list[tuple[int, str, int]] = []
        #: each method's latest unit: actors restarted between stages get it back with the next unit, so that
        #: entries the method keeps unchanged are carried over (:func:`cl_service.eval.stage.evaluate_stage`)
        self._last: dict[str, StageResult] = {}

    def start(self, setup: EvalSetup) -> None:
        self.setup = setup

    def _ensure_actors(self) -> None:
        if self.actors:
            return
        assert self.setup is not None, "start() first"
        gpu = eval_uses_gpu(self.cfg)
        n = min(self.n, len(self.cfg.methods))  # more actors than methods would sit idle
        threads = self.cfg.eval.threads or max(1, int(self.cfg.eval.cpus_per_worker))
        env = {**self.env, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        # A crashed actor is restarted once; its units come back to the driver, which sends them again after
        # syncing its mirror (not retried by Ray: the restarted actor's mirror may be empty).
        cls = ray.remote(_EvalActor).options(
            num_cpus=self.cfg.eval.cpus_per_worker, num_gpus=self.cfg.eval.num_gpus if gpu else 0,
            max_restarts=1, max_task_retries=0, runtime_env={"env_vars": env})
        if self.beats is None:
            self.beats = Beats.remote()
        self.actors = [cls.remote(self.setup, "cuda" if gpu else None, threads, self.driver_node, i,
                                  self.force_mirror, Beat(self.beats, str(i))) for i in range(n)]
        try:
            ready = ray.get([a.ready.remote() for a in self.actors], timeout=self.stall_s)
        except BaseException:
            self._stop()
            raise
        self.mirrors = [m for _, m, _ in ready]
        self.lives = [life for _, _, life in ready]
        if not self._started:
            k = sum(m is not None for m in self.mirrors)
            self.log(f"evaluation: {n} evaluator actor(s), each holding the base on "
                     f"{', '.join(sorted({d for d, _, _ in ready}))}"
                     + (f"; {k} on other nodes, reading adapters from a local mirror" if k else ""))
        self._started = True

    def _refresh(self, k: int) -> bool:
        """Ask actor ``k`` where it is now (Ray may have restarted it, perhaps on another node); whether this is a
        new life. Raises when it is gone for good."""
        deadline = time.monotonic() + self.stall_s
        while True:
            try:
                _, mirror, life = ray.get(self.actors[k].ready.remote(),
                                          timeout=max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:
                # Ray is still restarting it: ask again until its new life answers (or the stall bound passes).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        new = life != self.lives[k]
        if new:
            self.log(f"evaluation: evaluator {k} was restarted"
                     + (f"; its mirror {mirror} is synced again" if mirror is not None else ""))
        self.mirrors[k], self.lives[k] = mirror, life
        return new

    def _sync_mirrors(self, stage: int, only: Sequence[int] | None = None) -> None:
        """Make every mirroring actor's (of ``only``: those actors') ``adapters/`` equal the results folder's:
        send each missing or changed folder once (read once, put once, fetched by every actor that lacks it;
        one folder in the object store at a time, so a 7B run's adapters never sit in memory together), drop
        the ones gone."""
        mirroring = [a for k, (a, m) in enumerate(zip(self.actors, self.mirrors))
                     if m is not None and (only is None or k in only)]
        if not mirroring:
            return
        root = Path(self.setup.out) / "adapters"
        source = transfer.inventory(root)
        held = ray.get([a.inventory.remote() for a in mirroring], timeout=self.stall_s)
        plans = [transfer.plan(source, h) for h in held]
        size = 0
        for rel in sorted({rel for send, _ in plans for rel in send}):
            files = transfer.folder_files(root / rel)
            size += sum(len(b) for b in files.values())
            ref = ray.put(files)
            del files
            to = [a for a, (send, _) in zip(mirroring, plans) if rel in send]
            ray.get([a.receive.remote(rel, ref) for a in to], timeout=self.stall_s)
            del ref
            self.sent.append((stage, rel, len(to)))
        ray.get([a.drop.remote(gone) for a, (_, gone) in zip(mirroring, plans) if gone], timeout=self.stall_s)
        sent = sum(1 for s, _, _ in self.sent if s == stage)
        if sent:
            self.log(f"[stage {stage + 1}] sent {sent} adapter folder(s) ({size / 2 ** 20:.1f} MiB) to "
                     f"{len(mirroring)} evaluator mirror(s)")

    def evaluate(self, stage: int, methods: Sequence[str], train_s: float) -> Iterator[tuple[str, StageResult]]:
        if not methods:
            return
        self._ensure_actors()
        try:
            # restarted since the last stage (or during this one, below): they lost their own previous units
            fresh = {k for k in range(len(self.actors)) if self._refresh(k)}
            self._sync_mirrors(stage)
        except BaseException:
            self._stop()
            raise
        order = list(self.cfg.methods)

        def send(m: str):
            k = order.index(m) % len(self.actors)
            # Resident actors keep their own previous units; restarted ones get them from here.
            previous = None if self.resident and k not in fresh else self._last.get(m)
            return self.actors[k].evaluate.remote(self.lives[k], m, stage, train_s, previous), m, k

        units = {ref: (m, k) for ref, m, k in map(send, methods)}
        resent = 0
        watch = Watch(self.beats, self.stall_s, lambda tag, _: f"evaluation of stage {stage} by evaluator {tag} "
                      f"({sorted(m for m, k in units.values() if str(k) == tag)})")
        for k in {k for _, k in units.values()}:
            watch.start(str(k))
        try:
            while units:
                ready, _ = ray.wait(list(units), num_returns=1, timeout=_POLL_S)
                if not ready:
                    watch.check()
                    continue
                m, k = units.pop(ready[0])
                try:
                    result = ray.get(ready[0], timeout=self.stall_s)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.RayTaskError) as e:
                    if isinstance(e, ray.exceptions.RayTaskError) and not isinstance(e.cause, Restarted):
                        raise
                    # The actor died (Ray restarts it once) or was restarted: sync its mirror, send the unit again.
                    self.restarts, resent = self.restarts + 1, resent + 1
                    if resent > 2 * len(methods):  # each actor restarts once: every unit goes again at most twice
                        raise RuntimeError(f"evaluation of stage {stage}: evaluator {k} keeps failing: {e}") from e
                    if self._refresh(k):
                        fresh.add(k)
                        self._sync_mirrors(stage, [k])
                    ref, m, k = send(m)
                    units[ref] = (m, k)
                    watch.start(str(k))
                    continue
                watch.start(str(k))  # a finished unit is progress too
                if not any(kk == k for _, kk in units.values()):
                    watch.stop(str(k))
                self._last[m] = result
                yield m, result
        except BaseException:
            self._stop()
            raise
        if not self.resident and stage < len(self.setup.tasks) - 1:
            self.log(f"[stage {stage + 1}] evaluators stopped until the next evaluation: {self._why}")
            self._stop()

    def _stop(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def close(self) -> None:
        """Stop the actors, removing their mirrors first (a run that failed mid-stage, whose actors are
        already stopped, leaves them for a rerun with the same ``out`` to reuse)."""
        mirroring = [a for a, m in zip(self.actors, self.mirrors) if m is not None]
        if mirroring:
            try:
                ray.get([a.remove_mirror.remote() for a in mirroring], timeout=self.stall_s)
            except Exception:  # noqa: BLE001  (a dead actor: its mirror stays in its node's temp folder)
                pass
        self._stop()
        if self.beats is not None:
            ray.kill(self.beats, no_restart=True)
            self.beats = None


def make_evaluator(cfg: Any, log: Callable[[str], None] = print, env: dict[str, str] | None = None):
    """The evaluator of a run on a Ray cluster (Ray initialised): :class:`RayEvaluator` when
    :func:`num_evaluators` is at least 1, else a :class:`LocalEvaluator` in this (the driver's) process,
    which then uses ``eval.threads`` torch threads (every CPU it may use by default)."""
    n = num_evaluators(cfg, ray.cluster_resources())
    if n >= 1:
        return RayEvaluator(cfg, n, env, log)
    import torch

    # Ray starts a job's driver with OMP_NUM_THREADS=1, which left one of a 2-core machine's cores idle
    # through every evaluation.
    torch.set_num_threads(cfg.eval.threads or len(os.sched_getaffinity(0)))
    return LocalEvaluator()
