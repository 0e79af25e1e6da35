"""``ray.persistent_workers``: one Ray Train worker group for every stage of a run (cl_service/on_ray/_group.py)."""

import json
import time
from pathlib import Path

import pytest

from cl_service.adapters.registry import read_adapter
from cl_service.config import RayCfg
from cl_service.train.job import DataPart, TrainJob

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _job(tmp_path, tiny_base, dcl_shards, name="expert/RS", task="RS", steps=6):
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.loop import TrainCfg

    return TrainJob(name=name, kind="expert", task=task, out_dir=str(tmp_path / name.replace("/", "_")),
                    base_path=str(tiny_base), dataset=str(dcl_shards), parts=(DataPart(task),),
                    lora=LoraCfg(rank=4, alpha=8), train=TrainCfg(lr=1e-2, max_steps=steps, batch_size=4),
                    description=task, seed=0)


def _checkpoint_dirs(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.rglob("*") if p.is_dir() and p.name.startswith(("resume-", "final-")))


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
    cfg = RayCfg(num_workers=2, cpus_per_worker=1, max_failures=1, checkpoint_every=2, timeout_s=240)
    storage = tmp_path / "storage"
    # The group's first attempt dies at step 3 of stage 1 (after the step-2 checkpoint) and restarts.
    trainer = RayTrainer(cfg, str(storage), env={"CLSVC_FAIL_AT_STEP": "3"}, persistent=True)
    try:
        times = trainer.fit([a])
        assert list(times) == ["expert/RS"] and times["expert/RS"] > 0
        assert _checkpoint_dirs(storage) == []  # the stage's checkpoints went once its adapter was in place
        trainer.fit([b])
        assert trainer.group.groups_started == 1  # both stages in one group
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
    assert _checkpoint_dirs(storage) == []
    # The same numbers as a group per stage, uninterrupted: the session's run of this very job (same weights_key)
    # on 2 workers in a non-persistent group (ddp_reference, conftest).
    assert a.weights_key() == ddp_reference["weights_key"]
    ref = ddp_reference["log"]
    assert ref["world_size"] == 2 and ref["resumed_from_step"] == 0
    assert log["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert _wait_cpus(ray_local, 2)


def test_a_stage_past_max_failures_fails_and_leaves_nothing_running(ray_local, tmp_path, tiny_base, dcl_shards):
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, steps=4)
    cfg = RayCfg(num_workers=1, cpus_per_worker=1, max_failures=0, checkpoint_every=2, timeout_s=240)
    trainer = RayTrainer(cfg, str(tmp_path / "s"), env={"CLSVC_FAIL_AT_STEP": "3"}, persistent=True)
    with pytest.raises(RuntimeError, match=r"failed 1 time\(s\) in this stage \(ray.max_failures=0\)"):
        trainer.fit([job])
    assert trainer.group.run_ref is None and trainer.group.queue is None
    assert not Path(job.out_dir).exists()
    assert _wait_cpus(ray_local, 2)


def test_ray_timeout_bounds_a_persistent_group_that_cannot_be_scheduled(ray_local, tmp_path, tiny_base, dcl_shards):
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, steps=2)
    trainer = RayTrainer(RayCfg(num_workers=3, cpus_per_worker=1, timeout_s=8), str(tmp_path / "s"), persistent=True)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"did not finish within ray.timeout_s=8 s"):
        trainer.fit([job])
    assert time.perf_counter() - t0 < 60
    assert trainer.group.run_ref is None and not Path(job.out_dir).exists()
    trainer.close()  # idempotent
    assert _wait_cpus(ray_local, 2)
