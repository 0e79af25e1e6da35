"""Replay variants: generated for every sequential method (none for per-task isolated experts), running their method
under their own name with each earlier task's replay part, sized by ``replay.samples_per_task`` or
``replay.fraction``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_service.config import load_run_cfg
from cl_service.methods import METHODS, StageContext
from cl_service.registry import Registry
from cl_service.train.job import DataPart, load_parts

TASKS = ["RS", "Med", "AD"]


def _ctx(stage, dcl_shards, *overrides):
    cfg = load_run_cfg(None, ["data.train_limit=10", "clmoe.experts=4", *overrides])
    return StageContext(stage, TASKS, {t: t for t in TASKS}, Path("/runs/r"), cfg, None,
                        {"base_path": "/bases/b", "dataset": str(dcl_shards)})


def test_every_sequential_method_and_no_other_has_a_replay_variant_listed_by_clsvc_ls(capsys):
    from cl_service.cli import main

    sequential = {n for n in METHODS.names() if getattr(METHODS.get(n), "sequential", False)
                  and not hasattr(METHODS.get(n), "replays")}
    assert {"lora_ft", "olora", "moelora", "clmoe"} <= sequential
    assert not sequential & {"mrlora", "mrlora_proto", "mrlora_ridge", "mrlora_knn", "oracle", "joint", "zero_shot"}
    variants = {n for n in METHODS.names() if n.endswith("_replay")}
    assert variants == {f"{n}_replay" for n in sequential}
    assert main(["ls", "methods"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert variants <= set(listed) and "replay" in listed["clmoe_replay"]


@pytest.mark.parametrize("name", ["lora_ft", "olora", "moelora", "clmoe"])
def test_a_variant_runs_its_method_under_its_own_name_with_replay_parts(dcl_shards, name):
    for stage in (0, 1, 2):
        ctx = _ctx(stage, dcl_shards, "replay.samples_per_task=3")
        [base] = METHODS.get(name)().jobs(ctx)
        [job] = METHODS.get(f"{name}_replay")().jobs(ctx)
        assert job.name == base.name.replace(name, f"{name}_replay", 1)
        assert Path(job.out_dir) == Path(base.out_dir.replace(f"/{name}/", f"/{name}_replay/"))
        if stage:
            assert Path(job.init_adapter).name == Path(base.init_adapter).name
            assert Path(job.init_adapter).parent.name == f"{name}_replay"  # continues its own previous stage
        assert job.parts[0] == base.parts[0] and job.kind == base.kind and job.options == base.options
        assert job.parts[1:] == tuple(DataPart(t, limit=3, seed=1) for t in TASKS[:stage])
        if stage == 0:  # nothing earlier to replay: the method's own weights (trained once, published twice)
            assert job.weights_key() == base.weights_key()


def test_replay_fraction_sizes_each_earlier_task_as_a_share_of_the_new_tasks_training_set(dcl_shards):
    [job] = METHODS.get("lora_ft_replay")().jobs(_ctx(2, dcl_shards, "replay.fraction=0.3"))
    assert job.parts[1:] == (DataPart("RS", share=0.3, seed=1), DataPart("Med", share=0.3, seed=1))
    samples = load_parts(job)
    counts = {t: sum(s.task == t for s in samples) for t in TASKS}
    assert counts == {"AD": 10, "RS": 3, "Med": 3}  # data.train_limit=10 of AD; round(0.3 x 10) of each earlier task
    [plain] = METHODS.get("lora_ft_replay")().jobs(_ctx(2, dcl_shards, "replay.samples_per_task=3"))
    assert plain.key() != job.key()
    assert [s.id for s in load_parts(plain)] == [s.id for s in samples]  # the same seeded choice of 3
    with pytest.raises(Exception, match="fraction=0.0 is out of range"):
        load_run_cfg(None, ["replay.fraction=0"])


def test_a_method_added_later_gets_its_variant_without_a_file_of_its_own(dcl_shards):
    """What the methods package does for the built-in ones, for a new sequential method."""
    from cl_service.methods.common import stage_job
    from cl_service.methods.replay import register_replay_variants

    class Newer:
        """A new sequential method."""

        name = "newer"
        routed = False
        sequential = True
        serving = "not served"

        def jobs(self, ctx):
            return [stage_job(ctx, self.name, "sequential")]

        def evaluates(self, ctx):
            return True

    class Isolated:
        name = "isolated"
        routed = False

    reg: Registry[type] = Registry("method")
    reg.register("newer", Newer)
    reg.register("isolated", Isolated)
    assert register_replay_variants(reg) == ["newer_replay"] and register_replay_variants(reg) == []
    variant = reg.get("newer_replay")
    assert variant.serving == "not served" and not variant.routed and "newer with replay" in variant.__doc__
    [job] = variant().jobs(_ctx(1, dcl_shards))
    assert job.name == "newer_replay/stage-1" and job.parts[1] == DataPart("RS", limit=20, seed=1)
