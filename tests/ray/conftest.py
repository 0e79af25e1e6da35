"""Ray tier: one local Ray instance on loopback per session, 2 CPUs."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported: clients of token-auth clusters

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if ray.is_initialized():
        yield ray
        return
    # A short temp dir: Ray's unix sockets must fit in ~107 characters.
    tmp = tempfile.mkdtemp(prefix="clsvc-ray-", dir="/tmp")
    # Every worker runs clsvc_faults.install (it injects the faults a test asks for in its workers' env vars).
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.getcwd(), here])},
                                               "worker_process_setup_hook": "clsvc_faults.install"})
    yield ray
    ray.shutdown()


def _rs_job(out_dir, tiny_base, dcl_shards):
    """The job the Ray Train tests kill and resume: 6 steps of a rank-4 LoRA on RS, batch 4, lr 1e-2, seed 0."""
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.job import DataPart, TrainJob
    from cl_service.train.loop import TrainCfg

    return TrainJob(name="expert/RS", kind="expert", task="RS", out_dir=str(out_dir), base_path=str(tiny_base),
                    dataset=str(dcl_shards), parts=(DataPart("RS"),), lora=LoraCfg(rank=4, alpha=8),
                    train=TrainCfg(lr=1e-2, max_steps=6, batch_size=4), description="RS", seed=0)


@pytest.fixture(scope="session")
def ddp_reference(ray_local, tmp_path_factory, tiny_base, dcl_shards):
    """An uninterrupted run of ``_rs_job`` on 2 gloo workers, a group of its own: what a killed
    and resumed run must equal (tests/ray/test_train_ray.py, per-stage groups; test_train_persistent.py, one group
    for every stage). Trained once per session: ``{"weights_key": ..., "log": train_log.json}``; a test compares
    only a job of the same ``weights_key`` (everything that determines the trained weights)."""
    import json

    from cl_service.config import RayCfg
    from cl_service.on_ray.train import RayTrainer

    tmp = tmp_path_factory.mktemp("ddp-reference")
    job = _rs_job(tmp / "uninterrupted", tiny_base, dcl_shards)
    cfg = RayCfg(num_workers=2, cpus_per_worker=1, max_failures=2, checkpoint_every=2, stall_timeout_s=300)
    RayTrainer(cfg, str(tmp / "storage")).fit([job])
    return {"weights_key": job.weights_key(), "log": json.loads((tmp / "uninterrupted" / "train_log.json").read_text()),
            "adapter": tmp / "uninterrupted"}
