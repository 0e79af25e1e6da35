"""Evaluator actors answer exactly as the driver does: same predictions, item by item, and same matrices."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from cl_service.config import load_run_cfg
from cl_service.run import LocalTrainer, run_stream

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

METHODS = "mrlora,mrlora_knn,oracle,zero_shot,lora_ft,modalprompt,disco"


def _cfg(out, tiny_base, dcl_shards, extra=()):
    return load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
        f"methods=[{METHODS}]", "expert.train.max_steps=3", "expert.train.batch_size=4",
        "router.train.max_steps=3", "router.samples_per_task=4", "expert.lora.rank=4", "router.lora.rank=4",
        "modalprompt.prompts=4", "modalprompt.train.max_steps=3", "modalprompt.train.batch_size=4", "eval.max_new_tokens=3", "ray.num_workers=0", *extra])


def _predictions(out: Path) -> dict[str, list[dict]]:
    return {str(f.relative_to(out)): [json.loads(line) for line in f.read_text().splitlines()]
            for f in sorted((out / "predictions").rglob("*.jsonl"))}


def _copy_adapters(src: Path, dst: Path) -> None:
    """A results folder with the trained adapters only: the run there trains nothing and evaluates everything."""
    shutil.copytree(src / "adapters", dst / "adapters")


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval-local")
    metrics = run_stream(_cfg(out, tiny_base, dcl_shards), LocalTrainer(), log=lambda s: None)
    return {"out": out, "metrics": metrics, "predictions": _predictions(out)}


def _assert_same(local, out: Path, metrics, methods) -> None:
    preds = _predictions(out)
    want = {k: v for k, v in local["predictions"].items() if k.split("/")[1] in methods}
    assert sorted(preds) == sorted(want) and preds
    for f, lines in want.items():
        assert len(preds[f]) == len(lines) > 0
        for a, b in zip(preds[f], lines):
            assert a == b, f
    for name in methods:
        got, ref = metrics["methods"][name], local["metrics"]["methods"][name]
        assert got["matrix"] == ref["matrix"], name
        assert got.get("router_accuracy") == ref.get("router_accuracy"), name
        for i, task in enumerate(["RS", "Med"]):
            rec = json.loads((out / "stages" / name / f"stage-{i}-{task}.json").read_text())
            old = json.loads((local["out"] / "stages" / name / f"stage-{i}-{task}.json").read_text())
            assert rec["row"] == old["row"] and rec["adapters"] == old["adapters"], (name, i)


def test_actors_evaluate_item_by_item_like_the_driver(ray_local, local, tmp_path, tiny_base, dcl_shards, monkeypatch):
    from cl_service.on_ray.evaluate import RayEvaluator

    def no_base_here(*a, **k):
        raise AssertionError("the driver loaded the base; the actors evaluate")

    monkeypatch.setattr("cl_service.models.mllm.load_mllm", no_base_here)  # this process only
    out = tmp_path / "actors"
    _copy_adapters(local["out"], out)
    cfg = _cfg(out, tiny_base, dcl_shards, ["eval.num_workers=2"])
    logs: list[str] = []
    ev = RayEvaluator(cfg, log=logs.append)
    assert ev.n == 2 and ev.resident  # 2 CPUs; training runs in this process
    started = []
    real = ev._ensure_actors

    def count_starts():
        started.append(not ev.actors)
        real()

    ev._ensure_actors = count_starts
    metrics = run_stream(cfg, LocalTrainer(), log=logs.append, evaluator=ev)
    assert not any("trained" in s and "already" not in s for s in logs), logs
    assert started == [True, False]  # started once, kept across both stages
    assert not ev.actors  # closed at the end
    assert sum("evaluator actor(s)" in s for s in logs) == 1
    _assert_same(local, out, metrics, METHODS.split(","))
    # the knn router was fit in an actor, from its own dataset handle, and saved for serving
    assert (out / "routers" / "knn" / "stage-1-Med").is_dir()


def test_actors_stop_between_stages_when_training_needs_their_cpus(ray_local, local, tmp_path, tiny_base, dcl_shards):
    """``ray.num_workers=2`` Ray Train workers and 2 evaluators cannot share 2 CPUs: the actors stop after each
    stage's evaluation and start again at the next (training itself runs in-process here)."""
    from cl_service.on_ray.evaluate import RayEvaluator

    out = tmp_path / "stopping"
    _copy_adapters(local["out"], out)
    methods = ["oracle", "zero_shot", "mrlora"]
    cfg = _cfg(out, tiny_base, dcl_shards,
               ["eval.num_workers=2", "ray.num_workers=2", f"methods=[{','.join(methods)}]"])
    logs: list[str] = []
    ev = RayEvaluator(cfg, log=logs.append)
    assert not ev.resident
    metrics = run_stream(cfg, LocalTrainer(), log=logs.append, evaluator=ev)
    assert sum("evaluators stopped" in s for s in logs) == 1  # after stage 1; the last stage just closes
    assert not ev.actors
    _assert_same(local, out, metrics, methods)
    # the restarted actor got oracle's stage-1 unit back from the driver: only the new task was answered
    rec = json.loads((out / "stages" / "oracle" / "stage-1-Med.json").read_text())
    assert rec["carried"] == ["RS"] and rec["items_answered"] == 6  # dcl_shards: 6 test items per task


def test_evaluators_that_cannot_fit_are_refused_at_once(ray_local, tmp_path, tiny_base, dcl_shards):
    from cl_service.on_ray.evaluate import RayEvaluator, num_evaluators

    cfg = _cfg(tmp_path, tiny_base, dcl_shards, ["eval.num_workers=3"])
    with pytest.raises(ValueError, match="3 evaluator actor"):
        RayEvaluator(cfg)
    # auto: one per GPU when evaluating on GPUs, else the driver
    auto = _cfg(tmp_path, tiny_base, dcl_shards)
    assert num_evaluators(auto, {"CPU": 8.0}) == 0
    assert num_evaluators(_cfg(tmp_path, tiny_base, dcl_shards, ["eval.use_gpu=true"]), {"CPU": 8.0, "GPU": 4.0}) == 4
    assert num_evaluators(_cfg(tmp_path, tiny_base, dcl_shards, ["ray.use_gpu=true"]), {"CPU": 8.0, "GPU": 2.0}) == 2


def test_the_ray_path_of_clsvc_run_evaluates_on_actors(ray_local, local, tmp_path, tiny_base, dcl_shards, monkeypatch):
    """``cl_service.on_ray.stream.run`` (``clsvc run``, ``workloads/run_stream.py``) with ``eval.num_workers=1``:
    the driver never loads the base; one Ray Train worker and one evaluator fit the 2 CPUs, so it stays up. ``disco``
    answers through per-request mixtures of its task LoRAs there as in the driver."""
    from cl_service.on_ray.stream import run

    def no_base_here(*a, **k):
        raise AssertionError("the driver loaded the base; the actors evaluate")

    monkeypatch.setattr("cl_service.models.mllm.load_mllm", no_base_here)
    out = tmp_path / "clsvc-run"
    _copy_adapters(local["out"], out)
    methods = ["oracle", "lora_ft", "modalprompt", "disco"]
    cfg = _cfg(out, tiny_base, dcl_shards,
               ["ray.num_workers=1", "eval.num_workers=1", f"methods=[{','.join(methods)}]"])
    logs: list[str] = []
    metrics = run(cfg, log=logs.append)
    assert sum("evaluator actor(s)" in s for s in logs) == 1 and not any("evaluators stopped" in s for s in logs)
    _assert_same(local, out, metrics, methods)


class _NoTraining:
    """The adapters are published by the test (copied from the in-process run), stage by stage."""

    def fit(self, jobs):
        raise AssertionError(f"nothing should train here: {[j.name for j in jobs]}")


def test_an_actor_on_another_node_evaluates_from_its_mirror_like_the_driver(ray_local, local, tmp_path, tiny_base,
                                                                           dcl_shards):
    """``mirror=True`` (what an actor on another node than the driver's does): the actor reads adapters only
    from its own mirror, which the driver fills before each stage with the folders it lacks; the knn router
    it fits comes back with the unit and the driver writes it. Predictions, matrices and stage records
    (adapter paths relative to the run folder, digests) equal in-process evaluation."""
    from cl_service.adapters.transfer import inventory
    from cl_service.on_ray.evaluate import RayEvaluator

    ref = local["out"]
    used = {i: set().union(*(json.loads(f.read_text())["adapters"] for f in (ref / "stages").glob(f"*/stage-{i}-*.json")))
            for i in (0, 1)}
    out = tmp_path / "mirrored"

    def publish(i):  # what stage i's training would publish: the reference's adapters, bit for bit
        for rel in used[i]:
            if not (out / rel).exists():
                shutil.copytree(ref / rel, out / rel)

    publish(0)
    cfg = _cfg(out, tiny_base, dcl_shards, ["eval.num_workers=1"])
    logs: list[str] = []
    ev = RayEvaluator(cfg, log=logs.append, mirror=True)
    mirrors: list[Path] = []

    def on_stage(info):
        mirror = Path(ev.mirrors[0])
        mirrors.append(mirror)
        assert mirror != out.resolve() and out.resolve() not in mirror.parents
        assert ray_local.get(ev.actors[0].inventory.remote()) == inventory(out / "adapters")
        assert not (mirror / "routers").exists()  # the actor wrote no router, not even into its mirror
        if info["stage"] == 0:
            publish(1)

    metrics = run_stream(cfg, _NoTraining(), log=logs.append, evaluator=ev, on_stage=on_stage)
    sent = {i: sorted(rel for s, rel, n in ev.sent if s == i and n == 1) for i in (0, 1)}
    strip = lambda rels: sorted(r.removeprefix("adapters/") for r in rels)  # noqa: E731
    assert sent[0] == strip(used[0]) and sent[1] == strip(used[1] - used[0])  # each folder sent once
    assert len(ev.sent) == len(sent[0]) + len(sent[1])
    assert sum("reading adapters from a local mirror" in s for s in logs) == 1
    _assert_same(local, out, metrics, METHODS.split(","))
    # the driver wrote the routers the actor fit, identical to the in-process ones
    for stage in ("stage-0-RS", "stage-1-Med"):
        got, want = out / "routers" / "knn" / stage, ref / "routers" / "knn" / stage
        assert (got / "router.safetensors").read_bytes() == (want / "router.safetensors").read_bytes()
        meta, ref_meta = (json.loads((d / "router.json").read_text()) for d in (got, want))
        assert meta.pop("fit_seconds") >= 0 and ref_meta.pop("fit_seconds") >= 0 and meta == ref_meta
    assert mirrors and not mirrors[0].exists()  # removed when the run closed its evaluators


def test_an_evaluator_restarted_with_an_empty_mirror_gets_it_synced_again(ray_local, local, tmp_path, tiny_base,
                                                                          dcl_shards):
    """An evaluator actor that crashes is restarted by Ray, perhaps on another node, where its mirror is empty. Here
    its mirror is removed and the actor killed after the driver synced it, before the stage's units go out: the
    driver finds the actor's new life, syncs its mirror again and sends the units again (the units sent to the
    old life are refused, never answered from an empty mirror). Predictions and matrices equal the driver's."""
    from cl_service.on_ray.evaluate import RayEvaluator

    out = tmp_path / "restarted"
    _copy_adapters(local["out"], out)
    methods = ["oracle", "lora_ft"]
    cfg = _cfg(out, tiny_base, dcl_shards, ["eval.num_workers=1", f"methods=[{','.join(methods)}]"])
    logs: list[str] = []
    ev = RayEvaluator(cfg, log=logs.append, mirror=True)
    real, crashed = ev._sync_mirrors, []

    def sync_then_crash(stage, *a, **k):
        real(stage, *a, **k)
        if stage == 0 and not crashed:
            crashed.append(ev.mirrors[0])
            shutil.rmtree(ev.mirrors[0])  # what a node that never had the mirror holds
            ray_local.kill(ev.actors[0], no_restart=False)  # Ray restarts it (max_restarts=1)
            deadline = time.monotonic() + 120  # restarted (its new life answers) before the units go out
            while True:
                try:
                    if ray_local.get(ev.actors[0].ready.remote(), timeout=120)[2] != ev.lives[0]:
                        break
                except ray_local.exceptions.ActorUnavailableError:
                    pass  # still restarting
                assert time.monotonic() < deadline
                time.sleep(0.2)

    ev._sync_mirrors = sync_then_crash
    metrics = run_stream(cfg, _NoTraining(), log=logs.append, evaluator=ev)
    assert crashed and ev.restarts >= 1
    assert sum("evaluator 0 was restarted" in s for s in logs) == 1, logs
    _assert_same(local, out, metrics, methods)
