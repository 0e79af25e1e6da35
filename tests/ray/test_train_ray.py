import json
from pathlib import Path

import pytest
import torch

from cl_service.adapters.lora import LoraCfg
from cl_service.adapters.registry import read_adapter
from cl_service.config import RayCfg
from cl_service.train.job import DataPart, TrainJob
from cl_service.train.loop import TrainCfg
from clsvc_faults import fault_env

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def _job(tmp_path, tiny_base, dcl_shards, name="expert/RS", steps=6):
    return TrainJob(name=name, kind="expert", task="RS", out_dir=str(tmp_path / name.replace("/", "_")),
                    base_path=str(tiny_base), dataset=str(dcl_shards), parts=(DataPart("RS"),),
                    lora=LoraCfg(rank=4, alpha=8), train=TrainCfg(lr=1e-2, max_steps=steps, batch_size=4),
                    description="rs", seed=0)


def _worker_log_count(ray, line: str) -> dict[str, int]:
    """Per worker log file of the (shared) Ray session: how often ``line`` occurs."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return {str(f): f.read_text(errors="replace").count(line) for f in logs.glob("worker-*") if f.suffix in (".out", ".err")}


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _same_weights(a, b, rtol=1e-6, atol=1e-7) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=rtol, atol=atol) for k in wa)


def _new_lines(before: dict[str, int], after: dict[str, int]) -> int:
    """Occurrences added since ``before``: per file, so that logs of earlier tests' workers that Ray removed in
    the meantime do not count against this test's."""
    return sum(max(0, n - before.get(f, 0)) for f, n in after.items())


def test_two_gloo_workers_train_and_a_killed_worker_resumes_from_checkpoint(ray_local, tmp_path, tiny_base, dcl_shards,
                                                                           ddp_reference):
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards)
    other = _job(tmp_path, tiny_base, dcl_shards, name="expert/Med", steps=2).replace(task="Med", parts=(DataPart("Med"),))
    cfg = RayCfg(num_workers=2, cpus_per_worker=1, max_failures=2, checkpoint_every=2, stall_timeout_s=300)
    # The first attempt dies after step 3 (after the step-2 resume point); FailureConfig restarts the group.
    trainer = RayTrainer(cfg, str(tmp_path / "storage"), env=fault_env(step=3, once=str(tmp_path)))
    before = _worker_log_count(ray_local, "expert/Med: step 2/2 loss")  # the Ray session is shared by tests
    trainer.fit([job, other])  # one worker group for both jobs, in order
    assert read_adapter(other.out_dir, other.key())["id"] == "expert:Med"
    meta = read_adapter(job.out_dir, job.key())
    assert meta["id"] == "expert:RS" and meta["kind"] == "expert"
    log = json.loads(open(f"{job.out_dir}/train_log.json").read())
    assert log["world_size"] == 2
    assert log["resumed_from_step"] == 2  # not from step 0
    assert log["steps"] == 6 and len(log["losses"]) == 6
    assert all(l == l and l < 1e4 for l in log["losses"])  # finite
    # Progress reaches the worker logs (which Ray forwards to the job log) once per line, not twice.
    assert _new_lines(before, _worker_log_count(ray_local, "expert/Med: step 2/2 loss")) == 1
    # The adapters came back through the job store (the workers never wrote the results folder), whose folders
    # were removed once the adapters were in place, as were Ray Train's own run folders.
    assert list((tmp_path / "storage").iterdir()) == [tmp_path / "storage" / "jobs"]
    assert not list((tmp_path / "storage" / "jobs").iterdir())
    # Resumed = uninterrupted: weights, optimizer, data position and each rank's RNG (LoRA dropout) restored. The
    # uninterrupted run of this very job (same weights_key) on 2 workers is the session's ddp_reference (conftest).
    assert job.weights_key() == ddp_reference["weights_key"]
    ref = ddp_reference["log"]
    assert ref["world_size"] == 2 and ref["resumed_from_step"] == 0
    assert log["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-7)
    assert _same_weights(job.out_dir, ddp_reference["adapter"])


@pytest.mark.long
def test_deepspeed_zero2_trains_on_two_gloo_workers_and_resumes(ray_local, tmp_path, tiny_base, dcl_shards):
    """ray.strategy=deepspeed: ZeRO-2 over 2 gloo workers; a killed worker resumes from its checkpoint."""
    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, name="expert/RS", steps=4)
    cfg = RayCfg(num_workers=2, cpus_per_worker=1, max_failures=2, checkpoint_every=2, stall_timeout_s=300,
                 strategy="deepspeed")
    RayTrainer(cfg, str(tmp_path / "storage"), env=fault_env(step=3, once=str(tmp_path))).fit([job])
    meta = read_adapter(job.out_dir, job.key())
    assert meta["id"] == "expert:RS"
    log = json.loads(open(f"{job.out_dir}/train_log.json").read())
    assert log["world_size"] == 2 and log["resumed_from_step"] == 2
    assert log["steps"] == 4 and all(l == l and l < 1e4 for l in log["losses"])
    assert log["losses"][0] != log["losses"][-1]  # it trained
    # The ZeRO-2 optimizer partitions (AdamW moments, fp32 master weights) come back with the resume: the
    # killed-and-resumed run ends where an uninterrupted one does, loss for loss and weight for weight.
    whole = job.replace(out_dir=str(tmp_path / "uninterrupted"))
    RayTrainer(cfg, str(tmp_path / "storage2")).fit([whole])
    ref = json.loads(open(f"{whole.out_dir}/train_log.json").read())
    assert ref["resumed_from_step"] == 0
    assert log["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert _same_weights(job.out_dir, whole.out_dir, rtol=1e-5)


def test_a_worker_trains_from_a_shipped_init_adapter_when_the_drivers_folder_is_not_there(
        ray_local, tmp_path, tiny_base, dcl_shards, monkeypatch):
    """A job that continues an adapter (``lora_ft`` stage >= 1, a continued router, olora, moelora) on a worker
    that cannot read the driver's results folder: the driver ships the init adapter's files through the object
    store and the worker trains from its own verified copy. Here the init folder is moved away right after the
    driver read it (and the worker is told to act as on another node): the job still trains, from the same
    weights (losses equal an in-process run from the folder itself), and publishes under the same key."""
    import os

    from cl_service.on_ray import train as ray_train
    from cl_service.on_ray.train import RayTrainer
    from cl_service.train.runner import run_train_job

    torch.set_num_threads(1)
    first = _job(tmp_path, tiny_base, dcl_shards, name="expert/RS", steps=2)
    run_train_job(first)
    cont = _job(tmp_path, tiny_base, dcl_shards, name="lora_ft/stage-1-Med", steps=3).replace(
        kind="sequential", task="Med", parts=(DataPart("Med"),), init_adapter=first.out_dir)
    key = cont.key()
    ref = cont.replace(out_dir=str(tmp_path / "in-process"))
    run_train_job(ref)  # the reference: reads the init adapter from its folder
    src, away = Path(first.out_dir), Path(first.out_dir + ".away")
    real_ship, real_collect = ray_train.ship_inits, ray_train.collect_adapters

    def ship_then_hide(*a, **k):  # the driver has read the folder (job keys, shipped files): now it is gone
        shipped = real_ship(*a, **k)
        os.rename(src, away)
        return shipped

    def restore_then_collect(*a, **k):  # back before the driver copies the result in (its key reads the folder)
        os.rename(away, src)
        return real_collect(*a, **k)

    monkeypatch.setattr(ray_train, "ship_inits", ship_then_hide)
    monkeypatch.setattr(ray_train, "collect_adapters", restore_then_collect)
    cfg = RayCfg(num_workers=1, cpus_per_worker=1, stall_timeout_s=300)
    RayTrainer(cfg, str(tmp_path / "storage"), mirror=True).fit([cont])
    assert not away.exists() and cont.key() == key
    meta = read_adapter(cont.out_dir, key)  # complete, verified, and of the same job key
    assert meta["job_key"] == key == read_adapter(ref.out_dir)["job_key"]
    log = json.loads((Path(cont.out_dir) / "train_log.json").read_text())
    want = json.loads((Path(ref.out_dir) / "train_log.json").read_text())
    assert log["steps"] == 3 and log["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (cont.out_dir, ref.out_dir))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # The control: a worker on the driver's node reads the init folder itself, and here it is gone, so it fails.
    with pytest.raises(Exception, match="holds no adapter"):
        RayTrainer(RayCfg(num_workers=1, cpus_per_worker=1, stall_timeout_s=300, max_failures=0),
                   str(tmp_path / "storage2"), mirror=False).fit([cont.replace(out_dir=str(tmp_path / "x"))])
    assert not (tmp_path / "x").exists()


def test_a_run_that_cannot_be_scheduled_stalls_and_the_cluster_stays_usable(ray_local, tmp_path, tiny_base,
                                                                            dcl_shards):
    """Three 1-CPU workers on a 2-CPU cluster: Train V2 would wait for them forever; with no progress reported for
    ``ray.stall_timeout_s`` the run is cancelled (and the worker group it owns) with a clear error, and the next run
    trains."""
    import time

    from cl_service.on_ray.train import RayTrainer

    job = _job(tmp_path, tiny_base, dcl_shards, steps=2)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"no progress for \d+ s \(ray.stall_timeout_s=8\)"):
        RayTrainer(RayCfg(num_workers=3, cpus_per_worker=1, stall_timeout_s=8), str(tmp_path / "s1")).fit([job])
    assert time.perf_counter() - t0 < 60
    assert not Path(job.out_dir).exists()
    RayTrainer(RayCfg(num_workers=1, cpus_per_worker=1, stall_timeout_s=300), str(tmp_path / "s2")).fit([job])
    assert read_adapter(job.out_dir, job.key())["id"] == "expert:RS"


def test_parallel_experts_train_independent_jobs_as_concurrent_runs(ray_local, tmp_path, tiny_base, dcl_shards):
    """``ray.parallel_experts``: a stage's independent jobs get a worker group each, at once (on GPUs: different
    GPUs); each adapter equals the one the same job trains in a shared group, one job after another."""
    from cl_service.on_ray.train import RayTrainer

    def jobs(root):
        rs = _job(root, tiny_base, dcl_shards, steps=3)
        med = _job(root, tiny_base, dcl_shards, name="expert/Med", steps=3).replace(task="Med", parts=(DataPart("Med"),))
        return [rs, med]

    par, seq = jobs(tmp_path / "par"), jobs(tmp_path / "seq")
    times = RayTrainer(RayCfg(num_workers=1, cpus_per_worker=1, parallel_experts=True, stall_timeout_s=300),
                       str(tmp_path / "storage")).fit(par)
    assert set(times) == {"expert/RS", "expert/Med"}  # one run per job
    together = RayTrainer(RayCfg(num_workers=1, cpus_per_worker=1, stall_timeout_s=300), str(tmp_path / "storage2")).fit(seq)
    assert set(together) == {"expert/RS+expert/Med"}
    for a, b in zip(par, seq):
        assert read_adapter(a.out_dir, a.key())["id"] == read_adapter(b.out_dir, b.key())["id"]
        la, lb = (json.loads(open(f"{j.out_dir}/train_log.json").read()) for j in (a, b))
        assert la["steps"] == 3 and la["losses"] == pytest.approx(lb["losses"], rel=1e-6, abs=1e-7)


def test_two_gloo_workers_train_what_one_worker_trains_for_every_family(ray_local, tmp_path, tiny_base, dcl_shards):
    """DDP on 2 gloo workers (one persistent group, two stages) against the same jobs in one process, every step a
    full batch of all 24 samples (12 per rank): LoRA, O-LoRA grown from it (a penalty through the DDP-wrapped loss),
    CL-MoE with the paper's mechanisms (a preparation pass on every rank, task gates, the momentum update on
    save), SEFE on the LoRA (key positions, their penalty), two KeepLoRA stages (a gradient pass on every
    rank for the frozen A, one on rank 0 after training for the grown subspace), ModalPrompt (prompt rows inserted after BOS, a batch loss on features looked up per row, the second
    task's rows added to the first's) and the per-task LoRAs of HiDe-LLaVA / DISCO (the task's feature means over
    its own samples on every rank, the projector carried to the next task) end with the same weights and files. The two tasks are chosen so the ranks'
    shares hold equally many answer tokens: then the mean of the ranks' token-mean losses is the token-mean loss of
    the whole batch (ModalPrompt's feature terms are means over samples, equal in number on both ranks). Equal up to
    float rounding: the gradients are summed in another order, and AdamW's first steps, which normalise each entry,
    carry the last bits of tiny entries into the weights (measured: up to 2.4e-5 on steps of 1e-2); a wrong task gate
    or a missing momentum update moves weights by 1e-3 and more."""
    from safetensors.torch import load_file

    from cl_service.models.mllm import load_mllm
    from cl_service.on_ray.train import RayTrainer
    from cl_service.train.job import job_options, load_parts
    from cl_service.train.runner import run_train_job

    torch.set_num_threads(1)
    paper = job_options(paper=True, beta=0.5, momentum=0.7, top_k=2)
    prompts = job_options(prompts=4)
    features = job_options(features="routing")
    sefe = job_options(key_fraction=0.02, reg_weight=2.5e3)
    keep = job_options(grad_fraction=0.25, base_energy=0.6, task_energy=0.99)

    def jobs(root, per_rank, stage, init=None, keep_from=None):
        def job(name, kind, **kw):
            return TrainJob(name=f"{kind}/{name}", kind=kind, task="Fin", out_dir=str(root / name),
                            base_path=str(tiny_base), dataset=str(dcl_shards), parts=(DataPart("AD"), DataPart("Fin")),
                            lora=LoraCfg(rank=4, alpha=8, dropout=0.0),
                            train=TrainCfg(lr=1e-2, max_steps=3, batch_size=per_rank), description=name, seed=0, **kw)

        if stage == 0:
            return [job("lora", "expert"), job("clmoe-0", "clmoe", moe_experts=4, options=paper),
                    job("prompt-0", "modalprompt", options=prompts).replace(task="AD", lora=None),
                    job("tasklora-0", "tasklora", options=features), job("keeplora-0", "keeplora", options=keep)]
        return [job("olora", "olora", init_adapter=init[0].out_dir, orth_lambda=0.5),
                job("clmoe-1", "clmoe", moe_experts=4, options=paper, init_adapter=init[1].out_dir),
                job("prompt-1", "modalprompt", options=prompts, init_adapter=init[2].out_dir).replace(lora=None),
                job("tasklora-1", "tasklora", options=features, init_adapter=init[3].out_dir),
                job("sefe", "sefe", init_adapter=init[0].out_dir, options=sefe),
                job("keeplora-1", "keeplora", init_adapter=keep_from or init[4].out_dir, options=keep)]

    one0 = jobs(tmp_path / "one", 24, 0)
    mllm = load_mllm(tiny_base)
    tokens = [int((mllm.collate([s], train=True)["labels"] != -100).sum()) for s in load_parts(one0[0])]
    assert len(tokens) == 24 and sum(tokens[0::2]) == sum(tokens[1::2]), tokens  # the ranks' shares (runner)
    two0 = jobs(tmp_path / "two", 12, 0)
    two1 = jobs(tmp_path / "two", 12, 1, two0)
    trainer = RayTrainer(RayCfg(num_workers=2, cpus_per_worker=1, checkpoint_every=0, stall_timeout_s=300),
                         str(tmp_path / "storage"), persistent=True)
    try:
        trainer.fit(two0)
        trainer.fit(two1)
    finally:
        trainer.close()
    # KeepLoRA's A is an SVD of a gradient: its weaker directions turn with the last bits of the stage it starts from,
    # and AdamW's first steps carry that into B. Both stage 1s start from the same stage 0, so what is compared is
    # what the two workers do with it.
    one1 = jobs(tmp_path / "one", 24, 1, one0, keep_from=two0[4].out_dir)
    for j in one0 + one1:  # in this process, world size 1
        run_train_job(j)
    for a, b in zip(two0 + two1, one0 + one1):
        assert json.loads((Path(a.out_dir) / "train_log.json").read_text())["world_size"] == 2
        files = sorted(f.name for f in Path(a.out_dir).glob("*.safetensors"))
        assert files == sorted(f.name for f in Path(b.out_dir).glob("*.safetensors")), a.name
        for f in files:
            ta, tb = load_file(str(Path(a.out_dir) / f)), load_file(str(Path(b.out_dir) / f))
            assert ta.keys() == tb.keys()
            for k in ta:
                if f == "clmoe_task_gates.safetensors":  # counts of top-k choices: exactly the same
                    assert torch.equal(ta[k], tb[k]), (a.name, k)
                elif f == "keeplora_subspace.safetensors":  # the same subspace (a singular vector's sign is free)
                    ua, ub = ta[k].float(), tb[k].float()
                    assert ua.shape == ub.shape and torch.allclose(ua.T @ ua, ub.T @ ub, atol=1e-2), (a.name, k)
                else:
                    assert torch.allclose(ta[k], tb[k], rtol=1e-3, atol=1e-4), (a.name, f, k)
