"""A study's plan: cells, the jobs they share (before anything runs), the study folder's spec."""

import pytest

from cl_service._cfgload import to_dict
from cl_service.config import load_run_cfg
from cl_service.study.plan import (StudyMismatch, cell_cfg, check_spec, job_plan, logical_keys, make_cells,
                                   record_training, stream_jobs)


def _base(dcl_shards, tiny_base, *extra):
    return to_dict(load_run_cfg(None, [f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
                                       "methods=[mrlora,oracle,lora_ft]", "router.mode=continue", *extra]))


def test_experts_are_shared_across_orders_per_seed_and_nothing_else(tmp_path, dcl_shards, tiny_base):
    base = _base(dcl_shards, tiny_base)
    cells = make_cells([("RS", "Med"), ("Med", "RS")], (0, 1))
    assert [c.id for c in cells] == ["o0-s0", "o0-s1", "o1-s0", "o1-s1"]
    desc = {"RS": "rs", "Med": "med"}
    stages = {c.id: stream_jobs(cell_cfg(base, c, tmp_path), c.order, desc, str(tiny_base), str(dcl_shards))
              for c in cells}
    assert [[j.name for j in s] for s in stages["o1-s0"]] == [["expert/Med", "lora_ft/stage-0"],
                                                              ["expert/RS", "router/stage-1", "lora_ft/stage-1"]]
    p = job_plan(cells, stages)
    # per cell: 2 experts, 1 router, lora_ft at 2 stages (stage 0 = the first expert's weights: a copy)
    assert (p["jobs"], p["trainings"], p["copies"], p["from_cache"], p["shared"]) == (20, 12, 4, 4, 8)
    assert p["per_cell"]["o0-s0"] == {"jobs": 5, "trains": 4, "shares": 1}
    assert p["per_cell"]["o1-s1"] == {"jobs": 5, "trains": 2, "shares": 3}
    assert [(s["job"], s["seed"], s["cells"]) for s in p["shared_jobs"]] == [
        ("expert/Med", 0, ["o0-s0", "o1-s0"]), ("expert/RS", 0, ["o0-s0", "o1-s0"]),
        ("expert/Med", 1, ["o0-s1", "o1-s1"]), ("expert/RS", 1, ["o0-s1", "o1-s1"])]
    assert p["to_train"] == 12 and p["already_trained"] == 0


def test_logical_keys_follow_the_init_adapter_and_ignore_folders(tmp_path, dcl_shards, tiny_base):
    base = _base(dcl_shards, tiny_base, "data.tasks=[RS,Med,AD]")
    a, b = make_cells([("RS", "Med", "AD"), ("RS", "Med", "AD")], (0,))[0], make_cells([("RS", "Med", "AD")], (0,))[0]
    desc = {"RS": "rs", "Med": "med", "AD": "ad"}
    ja = stream_jobs(cell_cfg(base, a, tmp_path / "x"), a.order, desc, str(tiny_base), str(dcl_shards))
    jb = stream_jobs(cell_cfg(base, b, tmp_path / "y"), b.order, desc, str(tiny_base), str(dcl_shards))
    # the continued router of stage 2 starts from stage 1's: the same chain in two folders is the same job
    ra, rb = ja[2][1], jb[2][1]
    assert ra.name == "router/stage-2" and ra.init_adapter != rb.init_adapter
    pa = {j.out_dir: logical_keys(j, {})[1] for s in ja for j in s}
    pb = {j.out_dir: logical_keys(j, {})[1] for s in jb for j in s}
    assert logical_keys(ra, pa) == logical_keys(rb, pb)
    other = stream_jobs(cell_cfg(base, make_cells([("Med", "RS", "AD")], (0,))[0], tmp_path / "z"),
                        ("Med", "RS", "AD"), desc, str(tiny_base), str(dcl_shards))
    po = {j.out_dir: logical_keys(j, {})[1] for s in other for j in s}
    assert logical_keys(other[2][1], po) != logical_keys(ra, pa)  # the pool's order differs


def test_a_study_folder_refuses_another_study(tmp_path, dcl_shards, tiny_base):
    base = _base(dcl_shards, tiny_base)
    orders = [("RS", "Med"), ("Med", "RS")]
    check_spec(tmp_path, base, orders, (0, 1))
    check_spec(tmp_path, {**base, "seed": 3, "out": "elsewhere"}, orders + [("RS", "Med")], (0, 1, 2))  # grows
    with pytest.raises(StudyMismatch, match="another config .*expert.lora.rank"):
        check_spec(tmp_path, {**base, "expert": {**base["expert"], "lora": {**base["expert"]["lora"], "rank": 4}}},
                   orders, (0,))
    with pytest.raises(StudyMismatch, match="order 1 was"):
        check_spec(tmp_path, base, [("RS", "Med"), ("RS", "Med")], (0,))


def test_cells_at_once_come_from_the_resources():
    from cl_service.on_ray.study import concurrency

    two = load_run_cfg(None, ["ray.num_workers=2", "ray.cpus_per_worker=1"])
    assert concurrency(two, {"CPU": 2.0}) == 1 and concurrency(two, {"CPU": 9.0}) == 4
    assert concurrency(two, {"CPU": 9.0}, cap=3) == 3 and concurrency(two, {"CPU": 1.0}) == 1  # never zero
    inproc = load_run_cfg(None, ["ray.num_workers=0", "ray.cpus_per_worker=1"])
    assert concurrency(inproc, {"CPU": 2.0}) == 2  # a cell training in its own process holds a CPU
    gpu = load_run_cfg(None, ["ray.num_workers=2", "ray.use_gpu=true", "ray.cpus_per_worker=1"])
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs bound it


def test_a_job_finished_by_a_killed_launch_still_counts_as_trained_once(tmp_path):
    """``trainings.jsonl``: a job recorded ``started`` whose adapter is complete in the study's cache was trained
    (its launch was killed before it recorded ``done``); one started and never finished was not; a key recorded
    done twice counts once; lines written before states existed count as done."""
    from cl_service.adapters.registry import finalize_adapter
    from cl_service.study.plan import TRAININGS, read_trainings
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.job import DataPart, TrainJob
    from cl_service.train.loop import TrainCfg

    def job(name):
        return TrainJob(name=name, kind="expert", task="RS", out_dir=str(tmp_path / name), base_path="b",
                        dataset="d", parts=(DataPart("RS"),), lora=LoraCfg(), train=TrainCfg())

    for key in ("k-finished", "k-done"):  # complete adapters in the cache
        (tmp_path / "cache" / key).mkdir(parents=True)
        (tmp_path / "cache" / key / "weights.bin").write_bytes(b"w")
        finalize_adapter(tmp_path / "cache" / key, id=key, kind="expert", task="RS", description="", base="b",
                         job_key=key)
    (tmp_path / "cache" / "k-unfinished").mkdir()  # no adapter.json: never finished
    record_training(tmp_path, "o0-s0", job("expert/RS"), "k-done", None, state="started")
    record_training(tmp_path, "o0-s0", job("expert/RS"), "k-done", 1.5)
    record_training(tmp_path, "o1-s0", job("expert/RS"), "k-done", 2.0)
    record_training(tmp_path, "o0-s1", job("router/stage-1"), "k-finished", None, state="started")
    record_training(tmp_path, "o0-s1", job("expert/Med"), "k-unfinished", None, state="started")
    with open(tmp_path / TRAININGS, "a") as f:
        f.write('{"cell": "o1-s1", "job": "expert/Sci", "key": "k-old", "seed": 1, "seconds": 3.0}\n{"cell": "o1')
    got = sorted((t["cell"], t["job"], t["key"], t["seconds"]) for t in read_trainings(tmp_path))
    assert got == [("o0-s0", "expert/RS", "k-done", 1.5), ("o0-s1", "router/stage-1", "k-finished", None),
                   ("o1-s1", "expert/Sci", "k-old", 3.0)]
