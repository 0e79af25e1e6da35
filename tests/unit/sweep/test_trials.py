"""Sweep trials without Ray: the per-stage hook, the shared adapter cache, done-records (resume), the report."""

import json
import threading
from pathlib import Path

import pytest
import torch

from cl_service.adapters.registry import read_adapter
from cl_service.run import LocalTrainer
from cl_service.sweep.cache import CachingTrainer, file_lock, try_lock, unlock
from cl_service.sweep.report import sweep_exit_code, write_sweep_report
from cl_service.sweep.space import expand, load_base, parse_space
from cl_service.sweep.trial import done_record, mark_stopped, mark_unfinished, pending_trials, run_trial, trial_dir

pytestmark = pytest.mark.timeout(600)


class CountingTrainer(LocalTrainer):
    def __init__(self):
        self.trained: list[str] = []

    def fit(self, jobs):
        self.trained += [j.name for j in jobs]
        return super().fit(jobs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep")
    base = load_base(None, [f"data.path={dcl_shards}", "data.tasks=[RS,Med]", "methods=[mrlora]",
                            "expert.train.max_steps=2", "expert.train.batch_size=4", "router.train.max_steps=2",
                            "router.lora.rank=2", "eval.max_new_tokens=3", "data.test_limit=4", "ray.num_workers=0"])
    space = parse_space({"space": {"router.samples_per_task": [2, 3], "expert.lora.rank": [2],
                                   "expert.lora.alpha": "2*rank"},
                         "sweep": {"asha": {"grace_period": 1, "reduction_factor": 2}}})
    trials = expand(space, base)
    trainer = CountingTrainer()
    reports: dict[str, list] = {}
    recs = [run_trial(t, base, out, trainer, report=reports.setdefault(t.id, []).append, base_path=str(tiny_base),
                      log=lambda m: None) for t in trials]
    return {"out": out, "base": base, "space": space, "trials": trials, "trainer": trainer, "reports": reports,
            "recs": recs, "tiny_base": tiny_base}


def test_router_sweep_trains_the_experts_once_and_each_router_once(sweep):
    # two trials share the expert config (rank, alpha, lr, data, base, seed): experts RS and Med train once;
    # their routers differ (2 vs 3 samples per task), so each trains its own.
    assert sorted(sweep["trainer"].trained) == ["expert/Med", "expert/RS", "router/stage-1", "router/stage-1"]
    a, b = (trial_dir(sweep["out"], t.id) / "seed-0" / "adapters" / "experts" for t in sweep["trials"])
    for task in ("RS", "Med"):
        ma, mb = read_adapter(a / task), read_adapter(b / task)  # verified copies in each run folder
        assert ma["files"] == mb["files"] and ma["job_key"] == mb["job_key"]
    assert [r["reused_adapters"] for r in sweep["recs"]] == [0, 2]
    ra, rb = (read_adapter(trial_dir(sweep["out"], t.id) / "seed-0" / "adapters" / "router" / "stage-1-Med")
              for t in sweep["trials"])
    assert ra["job_key"] != rb["job_key"]


def test_each_stage_is_reported_and_recorded(sweep):
    for t, rec in zip(sweep["trials"], sweep["recs"]):
        reps = sweep["reports"][t.id]
        assert [r["stage"] for r in reps] == [1, 2]  # the last one only after the done-record
        assert reps[0]["router_acc"] == 100.0  # one expert: nothing to route
        assert 0.0 <= reps[1]["router_acc"] <= 100.0
        assert reps[1]["acc_seen"] == pytest.approx((reps[1]["acc_task"] + _row(sweep, t)[0]) / 2)
        assert rec["state"] == "done" and rec["stages"] == 2
        metrics = json.loads((trial_dir(sweep["out"], t.id) / "seed-0" / "metrics.json").read_text())
        assert rec["MFT"] == pytest.approx(metrics["methods"]["mrlora"]["MFT"])
        progress = json.loads((trial_dir(sweep["out"], t.id) / "progress.json").read_text())
        assert [{k: v for k, v in p.items() if k != "seeds"} for p in progress] == reps  # + each seed's values


def test_each_trial_is_tracked_side_by_side_under_the_sweeps_tracking_folder(sweep):
    from cl_service.tracking.backends import read_tensorboard_scalars

    root = sweep["out"] / "tracking"
    assert sorted(p.name for p in root.iterdir()) == sorted(f"trial-{t.id}" for t in sweep["trials"])
    for t in sweep["trials"]:
        got = read_tensorboard_scalars(root / f"trial-{t.id}")
        acc = [v for _, v in got["eval/mrlora/acc_seen"]]
        assert acc == pytest.approx([r["acc_seen"] for r in sweep["reports"][t.id]], rel=1e-6)
        assert [s for s, _ in got["train/expert/RS/loss"]] == [1, 2]  # also where the cache provided the expert
    assert not list(sweep["out"].glob("trials/*/seed-*/tracking"))


def _row(sweep, t):
    m = json.loads((trial_dir(sweep["out"], t.id) / "seed-0" / "metrics.json").read_text())
    return m["methods"]["mrlora"]["matrix"][1]


def test_resume_launches_only_trials_without_a_done_record(sweep):
    out, trials = sweep["out"], sweep["trials"]
    assert pending_trials(out, trials) == []
    rec_path = trial_dir(out, trials[1].id) / "trial.json"
    saved = rec_path.read_text()
    rec_path.unlink()  # as if the sweep died after the trial's last stage
    try:
        assert pending_trials(out, trials) == [trials[1]]
        trainer = CountingTrainer()
        reports = []
        rec = run_trial(trials[1], sweep["base"], out, trainer, report=reports.append,
                        base_path=str(sweep["tiny_base"]), log=lambda m: None)
        assert trainer.trained == []  # everything verified by checksum, nothing retrained
        assert [r["stage"] for r in reports] == [1, 2] and rec["MFT"] == json.loads(saved)["MFT"]
    finally:
        rec_path.write_text(saved)


def test_report_rows_states_and_asha_table(sweep, tmp_path):
    out, trials = sweep["out"], sweep["trials"]
    result = write_sweep_report(out, sweep["space"], trials, 2, wall_s=12.0)
    assert [r["state"] for r in result["trials"]] == ["done", "done"]
    assert result["best"]["id"] in {t.id for t in trials}
    csv = (out / "sweep.csv").read_text().splitlines()
    assert len(csv) == 3 and "router.samples_per_task" in csv[0] and "MFT" in csv[0]
    md = (out / "report.md").read_text()
    assert "## Best configuration" in md and "## ASHA decisions" in md and "router_acc_vs_samples.png" in md
    assert (out / "router_acc_vs_samples.png").stat().st_size > 0 and (out / "mft_vs_rank.png").stat().st_size > 0
    # a trial the scheduler stopped after stage 1 is reported as such, with no final metrics
    rec_path = trial_dir(out, trials[1].id) / "trial.json"
    saved = rec_path.read_text()
    prog = trial_dir(out, trials[1].id) / "progress.json"
    saved_prog = prog.read_text()
    try:
        prog.write_text(json.dumps(json.loads(saved_prog)[:1]))
        mark_stopped(out, trials[1], "ASHA stopped it after stage 1")
        assert done_record(out, trials[1].id)["state"] == "stopped"
        result = write_sweep_report(out, sweep["space"], trials, 2)
        row = result["trials"][1]
        assert row["state"] == "stopped (ASHA)" and row["stages"] == 1 and row["MFT"] is None
        assert {"rung_stage": 1, "trial": 2, "decision": "stopped"}.items() <= \
            next(d for d in result["asha_decisions"] if d["trial"] == 2).items()
    finally:
        rec_path.write_text(saved)
        prog.write_text(saved_prog)


def test_cache_lock_is_exclusive_and_waits_are_bounded(tmp_path):
    fd = try_lock(tmp_path / ".k.lock")
    assert fd is not None
    assert try_lock(tmp_path / ".k.lock") is None  # another open file description: refused
    with pytest.raises(TimeoutError, match="could not lock"):
        with file_lock(tmp_path / ".k.lock", timeout_s=0.3, poll_s=0.1):
            pass
    got = []
    t = threading.Thread(target=lambda: got.append(_locked(tmp_path / ".k.lock")))
    t.start()
    unlock(fd)
    t.join(5)
    assert got == [True]


def _locked(path: Path) -> bool:
    with file_lock(path, timeout_s=5, poll_s=0.05):
        return True


def test_caching_trainer_copies_a_cached_adapter_without_training(sweep, tmp_path):
    out = sweep["out"]
    job_src = trial_dir(out, sweep["trials"][0].id) / "seed-0" / "adapters" / "experts" / "RS"
    meta = read_adapter(job_src)

    class Boom:
        def fit(self, jobs):
            raise AssertionError(f"should not train {[j.name for j in jobs]}")

    from cl_service.train.job import DataPart, TrainJob
    from cl_service.sweep.space import trial_cfg

    cfg = trial_cfg(sweep["base"], sweep["trials"][0], tmp_path)
    job = TrainJob(name="expert/RS", kind="expert", task="RS", out_dir=str(tmp_path / "x" / "RS"),
                   base_path=str(Path(sweep["tiny_base"]).resolve()), dataset=cfg.data.path,
                   parts=(DataPart(task="RS", limit=cfg.data.train_limit, seed=cfg.seed),), lora=cfg.expert.lora,
                   train=cfg.expert.train, description=meta["description"], seed=cfg.seed)
    assert job.key() == meta["job_key"]
    ct = CachingTrainer(Boom(), out / "cache")
    ct.fit([job])
    assert ct.reused == ["expert/RS"] and read_adapter(job.out_dir, job.key())["files"] == meta["files"]


def test_an_interrupted_or_failed_trial_is_recorded_but_not_done(sweep):
    """Interrupted and failed trials say so in the report and stay pending (the next launch runs them); the
    sweep's exit status is non-zero until every trial is done or stopped by the scheduler."""
    out, trials = sweep["out"], sweep["trials"]
    rec_path = trial_dir(out, trials[1].id) / "trial.json"
    saved = rec_path.read_text()
    try:
        assert sweep_exit_code(write_sweep_report(out, sweep["space"], trials, 2)) == 0
        for state in ("interrupted", "failed"):
            rec = mark_unfinished(out, trials[1], state, "interrupted by SIGTERM")
            assert rec["stages"] == 2 and done_record(out, trials[1].id) is None
            assert pending_trials(out, trials) == [trials[1]]
            result = write_sweep_report(out, sweep["space"], trials, 2)
            assert [r["state"] for r in result["trials"]] == ["done", state]
            assert sweep_exit_code(result) == 1
            assert sweep_exit_code({**result, "interrupted": "SIGTERM"}) == 143
            assert sweep_exit_code({**result, "interrupted": "SIGINT"}) == 130
    finally:
        rec_path.write_text(saved)


def test_a_trial_runs_its_configuration_at_every_seed_and_reports_the_mean(sweep):
    """Two seeds of one configuration in lockstep: each stage reports the mean over the seeds (what ASHA decides
    on), seed 0 comes from the cache of the sweep above, and the done-record and sweep.csv carry the mean with its
    interval (2 seeds: the bootstrap over the runs' test items)."""
    out = sweep["out"]
    space = parse_space({"space": {"router.samples_per_task": [2], "expert.lora.rank": [2],
                                   "expert.lora.alpha": "2*rank"}, "sweep": {"seeds": [0, 1]}})
    (spec,) = expand(space, sweep["base"])
    assert spec.seeds == (0, 1) and spec.label().endswith("seeds=0,1")
    trainer = CountingTrainer()
    reports: list[dict] = []
    rec = run_trial(spec, sweep["base"], out, trainer, report=reports.append, base_path=str(sweep["tiny_base"]),
                    log=lambda m: None)
    assert sorted(trainer.trained) == ["expert/Med", "expert/RS", "router/stage-1"]  # seed 1's; seed 0 cached
    progress = json.loads((trial_dir(out, spec.id) / "progress.json").read_text())
    per_seed = []
    for s in (0, 1):
        m = json.loads((trial_dir(out, spec.id) / f"seed-{s}" / "metrics.json").read_text())["methods"]["mrlora"]
        assert rec["per_seed"][str(s)]["MFT"] == pytest.approx(m["MFT"])
        per_seed.append(m)
    assert rec["MFT"] == pytest.approx((per_seed[0]["MFT"] + per_seed[1]["MFT"]) / 2)
    for k, (rep, p) in enumerate(zip(reports, progress)):
        a, b = (p["seeds"][s]["acc_seen"] for s in ("0", "1"))
        assert rep["acc_seen"] == pytest.approx((a + b) / 2) and "seeds" not in rep
        row = [per_seed[s]["matrix"][k][: k + 1] for s in (0, 1)]
        assert (a, b) == (pytest.approx(sum(row[0]) / (k + 1)), pytest.approx(sum(row[1]) / (k + 1)))
    iv = rec["intervals"]["MFT"]
    assert iv["n"] == 2 and iv["method"].startswith("percentile bootstrap") and iv["low"] <= rec["MFT"] <= iv["high"]
    result = write_sweep_report(out, space, [spec], 2, wall_s=1.0)
    row = result["trials"][0]
    assert (row["seeds"], row["MFT_low"], row["MFT_high"]) == ([0, 1], iv["low"], iv["high"])
    csv = (out / "sweep.csv").read_text().splitlines()
    assert "MFT_low" in csv[0] and "seeds" in csv[0] and '"0,1"' in csv[1]
    assert f"{rec['MFT']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]" in (out / "report.md").read_text()
