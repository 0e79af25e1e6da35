"""Tracking: the config section, the backends' registry, what a run sends (read back from real event files)."""

import contextlib
import importlib.abc
import json
import sys

import pytest
import torch

from cl_service._cfgload import ConfigError
from cl_service.config import load_run_cfg
from cl_service.tracking import (TRACKERS, TrackingCfg, TrackingUnavailable, check_available, open_tracker,
                                 tracking_dir)
from cl_service.tracking.backends import read_tensorboard_scalars
from cl_service.tracking.stream import job_scalars, stage_scalars
from cl_service.train.loop import TrainCfg, lr_lambda

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("override, message", [
    ("tracking.backend=nope", "tracking: backend='nope' is not a tracking backend; known: mlflow, none, tensorboard, wandb"),
    ("tracking.project=p", "names an MLflow experiment or W&B project"),
    ("tracking.uri=http://127.0.0.1:5000", "MLflow's tracking server"),
])
def test_bad_tracking_config_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_run_cfg(None, [override])
    assert load_run_cfg(None, ["tracking.backend=mlflow", "tracking.project=p"]).tracking.project == "p"
    assert TRACKERS.names() == ["mlflow", "none", "tensorboard", "wandb"]


class _Block(importlib.abc.MetaPathFinder):
    """Makes ``names`` unimportable, as on a machine without them."""

    def __init__(self, *names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"No module named {name!r}")
        return None


@pytest.mark.parametrize("backend, extra", [("mlflow", "tracking-mlflow"), ("wandb", "tracking-wandb"),
                                            ("tensorboard", "tensorboardX")])
def test_a_missing_backend_package_names_what_installs_it_before_any_work(backend, extra, tmp_path, monkeypatch,
                                                                           dcl_shards):
    from cl_service.run import run_stream

    block = _Block("mlflow", "wandb", "tensorboardX")
    for name in [m for m in sys.modules if m.split(".")[0] in block.names]:
        monkeypatch.delitem(sys.modules, name)
    sys.meta_path.insert(0, block)
    try:
        with pytest.raises(TrackingUnavailable, match=extra):
            check_available(TrackingCfg(backend=backend))
        cfg = load_run_cfg(None, [f"out={tmp_path / 'run'}", f"data.path={dcl_shards}", "methods=[zero_shot]",
                                  "ray.num_workers=0", f"tracking.backend={backend}"])
        with pytest.raises(TrackingUnavailable, match=rf"tracking.backend={backend} needs .*{extra}"):
            run_stream(cfg, log=lambda m: None)
        check_available(TrackingCfg(backend="none"))  # needs nothing
    finally:
        sys.meta_path.remove(block)
    assert list((tmp_path / "run").iterdir()) == []  # nothing was done


def test_job_scalars_give_the_optimizers_own_learning_rates_and_tokens_per_second():
    cfg = TrainCfg(lr=0.01, max_steps=6, warmup_ratio=0.34, min_lr_ratio=0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 6))
    used = []
    for _ in range(6):  # the lr each optimizer step of the loop uses
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    class _Job:
        train = cfg

    # Resumed after step 2: the finishing process timed steps 3..6 only; two ranks.
    log = {"steps": 6, "losses": [3.0, 2.5, 2.0, 1.5, 1.2, 1.0], "world_size": 2,
           "step_seconds": [0.5, 0.25, 1.0, 2.0], "step_tokens": [100, 100, 50, 10]}
    rows = job_scalars(_Job(), log)
    assert [s for s, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert [v["lr"] for _, v in rows] == pytest.approx(used)
    assert [v["loss"] for _, v in rows] == log["losses"]
    assert "tokens_per_s" not in rows[0][1] and "tokens_per_s" not in rows[1][1]
    assert [v["tokens_per_s"] for _, v in rows[2:]] == pytest.approx([400.0, 800.0, 100.0, 10.0])


def test_stage_scalars_of_a_record():
    rec = {"method": "mrlora", "stage": 1, "tasks": ["RS", "Med", "AD"], "row": [50.0, 70.0, None],
           "router_accuracy": {"RS": 100.0, "Med": 90.0}, "router_seconds": 0.5, "router_requests": 10,
           "train_s": 12.0, "eval_s": 3.0}
    v = stage_scalars(rec)
    assert v["acc_seen"] == 60.0 and v["acc_task"] == 70.0 and v["acc/AD"] is None
    assert v["router_acc/Med"] == 90.0 and v["router_ms_per_request"] == 50.0
    assert (v["train_s"], v["eval_s"]) == (12.0, 3.0)


def test_tensorboard_tracker_writes_event_files_read_back_tag_by_tag(tmp_path):
    t = open_tracker(TrackingCfg(), tmp_path / "out", run_name="r1", project="p")
    t.log_params({"expert.train.lr": 0.002})
    t.log_scalars(1, {"loss": 2.0, "lr": 1e-3, "skip": None, "nan": float("nan")}, prefix="train/expert/RS")
    t.log_scalars(2, {"loss": 1.5}, prefix="train/expert/RS")
    t.close()
    assert [p.parent.name for p in (tmp_path / "out" / "tracking").rglob("events.out.tfevents.*")] == ["r1"]
    got = read_tensorboard_scalars(tmp_path / "out" / "tracking")
    assert got == {"train/expert/RS/loss": [(1, 2.0), (2, 1.5)], "train/expert/RS/lr": [(1, pytest.approx(1e-3))]}
    # a relative tracking.dir is taken from the results folder, whatever the working directory; an absolute one as is
    assert tracking_dir(TrackingCfg(dir="tb"), tmp_path / "out") == tmp_path.resolve() / "out" / "tb"
    assert tracking_dir(TrackingCfg(dir=str(tmp_path / "tb")), tmp_path / "out") == tmp_path.resolve() / "tb"


def test_tracking_none_writes_nothing(tmp_path, tiny_base, dcl_shards):
    from cl_service.run import run_stream

    cfg = load_run_cfg(None, [f"out={tmp_path / 'run'}", f"data.path={dcl_shards}", f"base.path={tiny_base}",
                              "data.tasks=[RS]", "methods=[zero_shot]", "eval.max_new_tokens=2", "ray.num_workers=0",
                              "tracking.backend=none"])
    metrics = run_stream(cfg, log=lambda m: None)
    assert 0 <= metrics["methods"]["zero_shot"]["MFT"] <= 100
    assert not (tmp_path / "run" / "tracking").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "run" / "config.resolved.json").read_text())["config"]["tracking"]["backend"] == "none"


def test_progress_bars_stay_out_of_logs_unless_forced(capsys, monkeypatch):
    from cl_service._progress import bar

    monkeypatch.delenv("CLSVC_PROGRESS", raising=False)
    assert list(bar(3, "evaluating", "unit", iter("abc"))) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""  # stderr is not a terminal here, as in CI and Ray job logs
    monkeypatch.setenv("CLSVC_PROGRESS", "1")
    assert list(bar(3, "evaluating", "unit", iter("abc"))) == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert "evaluating:" in err and "/3 " in err


def test_an_mlflow_run_ends_as_the_clsvc_run_did(tmp_path, tiny_base, dcl_shards):
    """tracking.backend=mlflow with the real package (extra ``tracking-mlflow``): a run that fails is FAILED in
    MLflow, an interrupted one KILLED, a finished one FINISHED (read back from the MLflow store they share)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from cl_service.run import run_stream

    endings = {"finished": None, "failed": RuntimeError("stage failed"), "killed": KeyboardInterrupt()}
    for name, ending in endings.items():
        cfg = load_run_cfg(None, [f"out={tmp_path / name}", f"data.path={dcl_shards}", f"base.path={tiny_base}",
                                  "data.tasks=[RS]", "methods=[zero_shot]", "eval.max_new_tokens=2",
                                  "ray.num_workers=0", "tracking.backend=mlflow", "tracking.project=p",
                                  f"tracking.dir={tmp_path / 'mlflow'}"])

        def on_stage(info, ending=ending):  # the hook a sweep's scheduler stops a run from: it ends this run
            if ending is not None:
                raise ending

        with pytest.raises(type(ending)) if ending is not None else contextlib.nullcontext():
            run_stream(cfg, log=lambda m: None, on_stage=on_stage)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("failed", "FAILED"), ("finished", "FINISHED"), ("killed", "KILLED")]
    assert all("eval/zero_shot/acc/RS" in r.data.metrics for r in runs)  # what each logged before it ended
