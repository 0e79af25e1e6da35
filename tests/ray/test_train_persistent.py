"""``ray.persistent_workers``: one Ray Train worker group for every stage of a run (cl_service/on_ray/_group.py),
and what makes a long job finish whatever stops it: resume points kept per job, stalls instead of wall time."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from cl_service.adapters.registry import is_complete, read_adapter
from cl_service.config import RayCfg
from cl_service.train.job import DataPart, TrainJob
from clsvc_faults import ENV, HERE, fault_env

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def _job(tmp_path, tiny_base, dcl_shards, name="expert/RS", task="RS", steps=6):
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.loop import TrainCfg

    return TrainJob(name=name, kind="expert", task=task, out_dir=str(tmp_path / name.replace("/", "_")),
                    base_path=str(tiny_base), dataset=str(dcl_shards), parts=(DataPart(task),),
                    lora=LoraCfg(rank=4, alpha=8), train=TrainCfg(lr=1e-2, max_steps=steps, batch_size=4),
                    description=task, seed=0)


def _stored(storage: Path) -> list[str]:
    """What the job store holds: ``<job folder>/<entry>`` (resume points, adapters)."""
    return sorted(f"{p.parent.name}/{p.name}" for p in (storage / "jobs").glob("*/*"))


def _same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


def _wait_cpus(ray, n: float, within_s: float = 30) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if ray.available_resources().get("CPU", 0) >= n:
            return True
        time.sleep(0.5)
    return False


def test_one_group_trains_stage_after_stage_and_a_killed_worker_resumes(ray_local, tmp_path, tiny_base, dcl_shards,
                                                                        ddp_reference):
    from cl_service.on_ray.train import RayTrainer

    a = _job(tmp_path, tiny_base, dcl_shards)
    b = _job(tmp_path, tiny_base, dcl_shards, name="expert/Med", task="Med", steps=2)
    cfg = RayCfg(num_workers=2, cpus_per_worker=1, max_failures=1, checkpoint_every=2, stall_timeout_s=240)
    storage = tmp_path / "storage"
    # The group's ranks die after step 3 of stage 1 (after the step-2 resume point); a new group resumes the job.
    trainer = RayTrainer(cfg, str(storage), env=fault_env(step=3, once=str(tmp_path)), persistent=True)
    try:
        times = trainer.fit([a])
        assert list(times) == ["expert/RS"] and times["expert/RS"] > 0
        assert _stored(storage) == []  # the job's folder went once its adapter was in place
        trainer.fit([b])
        assert trainer.group.groups_started == 2  # the failed one, then one for the rest of stage 1 and stage 2
        queue, run_ref = trainer.group.queue, trainer.group.run_ref
    finally:
        trainer.close()
    assert trainer.group.queue is None and ray_local.wait([run_ref], timeout=0)[0]  # ended, not cancelled
    assert ray_local.get(run_ref) is None
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(queue.done.remote(0), timeout=30)
    assert read_adapter(b.out_dir, b.key())["id"] == "expert:Med"
    assert read_adapter(a.out_dir, a.key())["id"] == "expert:RS"
    log = json.loads(Path(a.out_dir, "train_log.json").read_text())
    assert log["world_size"] == 2 and log["resumed_from_step"] == 2 and log["steps"] == 6
    assert list(storage.iterdir()) == [storage / "jobs"] and _stored(storage) == []
    # The same numbers as a group per stage, uninterrupted: the session's run of this very job (same weights_key)
    # on 2 workers in a non-persistent group (ddp_reference, conftest).
    assert a.weights_key() == ddp_reference["weights_key"]
    ref = ddp_reference["log"]
    assert ref["world_size"] == 2 and ref["resumed_from_step"] == 0
    assert log["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert _same_weights(a.out_dir, ddp_reference["adapter"])
    assert _wait_cpus(ray_local, 2)


def test_failures_before_a_stage_starts_count_against_max_failures(ray_local, tmp_path, tiny_base, dcl_shards):
    """Every group dies as it starts, before it takes the stage: the stage is given up after ``max_failures``
    restarts (not retried forever), and nothing is left running."""
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, steps=4)
    cfg = RayCfg(num_workers=1, cpus_per_worker=1, max_failures=1, checkpoint_every=2, stall_timeout_s=120)
    trainer = RayTrainer(cfg, str(tmp_path / "s"), env=fault_env(group_start=True), persistent=True)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"failed 2 time\(s\) in this stage \(ray.max_failures=1\)"):
        trainer.fit([job])
    assert time.perf_counter() - t0 < 100
    assert trainer.group.groups_started == 2
    assert trainer.group.run_ref is None and trainer.group.queue is None
    assert not Path(job.out_dir).exists()
    assert _wait_cpus(ray_local, 2)


def test_a_persistent_group_that_cannot_be_scheduled_stalls(ray_local, tmp_path, tiny_base, dcl_shards):
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, steps=2)
    trainer = RayTrainer(RayCfg(num_workers=3, cpus_per_worker=1, stall_timeout_s=8), str(tmp_path / "s"),
                         persistent=True)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"no progress for \d+ s \(ray.stall_timeout_s=8\)"):
        trainer.fit([job])
    assert time.perf_counter() - t0 < 60
    assert trainer.group.run_ref is None and not Path(job.out_dir).exists()
    trainer.close()  # idempotent
    assert _wait_cpus(ray_local, 2)


def test_ranks_end_an_idle_period_together(ray_local):
    """Both ranks of a group wait for the next stage; the first to find the group idle for ``idle_s`` ends it for
    every rank, and a stage that comes after that is refused (the driver starts a new group) instead of being
    taken by the rank that is still there while the other has gone."""
    from cl_service.on_ray._group import _StageQueue

    q = _StageQueue.remote(1.0)
    assert ray_local.get(q.put.remote(["job"], ["key"], None), timeout=30) == 0
    assert ray_local.get(q.take.remote(-1, 5.0), timeout=30)[0] == 0  # rank 0
    assert ray_local.get(q.take.remote(-1, 5.0), timeout=30)[0] == 0  # rank 1
    ray_local.get(q.done.remote(0), timeout=30)
    assert ray_local.get(q.take.remote(0, 3.0), timeout=30) == "stop"  # rank 1: idle past idle_s, for the group
    assert ray_local.get(q.put.remote(["job"], ["key"], None), timeout=30) is None  # refused
    assert ray_local.get(q.take.remote(0, 0.1), timeout=30) == "stop"  # rank 0, however late it asks
    ray_local.kill(q)


def test_a_failed_adapter_collection_keeps_the_stages_other_adapters(ray_local, tmp_path, tiny_base, dcl_shards,
                                                                     monkeypatch):
    """The first job's stored adapter is damaged before the driver takes it: that job alone is reported and
    trains again; the other finished adapter of the stage is in place, not deleted."""
    from cl_service.on_ray import train as ray_train
    from cl_service.on_ray.train import RayTrainer

    a = _job(tmp_path, tiny_base, dcl_shards, steps=2)
    b = _job(tmp_path, tiny_base, dcl_shards, name="expert/Med", task="Med", steps=2)
    trainer = RayTrainer(RayCfg(num_workers=1, cpus_per_worker=1, stall_timeout_s=240), str(tmp_path / "s"),
                         persistent=True)
    real = ray_train.collect_adapters
    damaged = []

    def damage_then_collect(*args, **kw):
        if not damaged:
            f = next((tmp_path / "s" / "jobs").glob("expert_RS-*/adapter/adapter_model.safetensors"))
            f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
            damaged.append(f)
        return real(*args, **kw)

    monkeypatch.setattr(ray_train, "collect_adapters", damage_then_collect)
    try:
        with pytest.raises(RuntimeError, match=r"the adapter of expert/RS did not arrive intact"):
            trainer.fit([a, b])
        assert damaged and is_complete(b.out_dir, b.key()) and not Path(a.out_dir).exists()
        assert _stored(tmp_path / "s") == []  # b's folder went with its adapter in place, a's damaged one too
        todo = [j for j in (a, b) if not is_complete(j.out_dir, j.key())]
        assert todo == [a]
        trainer.fit(todo)
    finally:
        trainer.close()
    assert is_complete(a.out_dir, a.key())
    assert trainer.group.groups_started == 1


@pytest.mark.long
def test_clsvc_run_cut_by_a_stall_then_by_a_driver_kill_resumes_to_the_uninterrupted_job(
        ray_local, tmp_path, tiny_base, dcl_shards, spawn, ddp_reference):
    """``clsvc run`` (on the session's cluster, ``RAY_ADDRESS``) three times on one results folder, its one job the
    session's reference job: the first is cut by ``ray.stall_timeout_s`` (the workers hang after step 3), the
    second resumes from step 2 and its driver is SIGKILLed once the step-4 resume point is stored (the workers
    hang after step 5), the third resumes from step 4 and finishes: losses and adapter weights equal an
    uninterrupted run of the job."""
    out = tmp_path / "run"
    jobs = out / "ray" / "jobs"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, CLSVC_RAY_DASHBOARD="0",
               RAY_RUNTIME_ENV_HOOK="clsvc_faults.runtime_env", PYTHONPATH=os.pathsep.join([str(REPO), HERE]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop(ENV, None)
    args = [sys.executable, "-m", "cl_service.cli", "run", f"out={out}", f"data.path={dcl_shards}",
            f"base.path={tiny_base}", "data.tasks=[RS]", "methods=[oracle]", "expert.train.max_steps=6",
            "expert.train.batch_size=4", "expert.train.lr=0.01", "expert.lora.rank=4", "expert.lora.alpha=8",
            "eval.max_new_tokens=3", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.checkpoint_every=2",
            "tracking.backend=none"]
    for d in ("hang3", "hang5"):
        (tmp_path / d).mkdir()

    def complete(step: int) -> bool:
        return any(jobs.glob(f"expert_RS-*/step-{step:06d}/COMPLETE"))

    p = spawn(args + ["ray.stall_timeout_s=40"],
              env=env | fault_env(step=3, action="hang", once=str(tmp_path / "hang3")), cwd=str(REPO))
    assert p.finish(timeout=200) != 0
    assert "no progress for" in p.output() and "ray.stall_timeout_s=40" in p.output(), p.output()[-3000:]
    assert complete(2) and not (out / "adapters" / "experts" / "RS").exists()

    p = spawn(args + ["ray.stall_timeout_s=300"],
              env=env | fault_env(step=5, action="hang", once=str(tmp_path / "hang5")), cwd=str(REPO))
    p.wait_for(lambda: complete(4), timeout=200)
    p.signal(signal.SIGKILL, group=True)
    assert p.finish(timeout=30) == -signal.SIGKILL
    assert any("expert/RS: resuming from step 2" in line for line in p.lines), p.output()[-3000:]

    p = spawn(args + ["ray.stall_timeout_s=300"], env=env, cwd=str(REPO))
    assert p.finish(timeout=200) == 0, p.output()[-3000:]
    expert = out / "adapters" / "experts" / "RS"
    log = json.loads((expert / "train_log.json").read_text())
    assert log["resumed_from_step"] == 4 and log["steps"] == 6 and log["world_size"] == 2
    assert log["losses"] == pytest.approx(ddp_reference["log"]["losses"], rel=1e-6, abs=1e-7)
    assert _same_weights(expert, ddp_reference["adapter"])
    assert not list(jobs.iterdir())  # the job's folder went once its adapter was in place
    assert _wait_cpus(ray_local, 2)
