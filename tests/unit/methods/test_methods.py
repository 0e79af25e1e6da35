"""Contract of every registered CL method on a 2-task tiny stream, plus resume."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cl_service.config import load_run_cfg
from cl_service.methods import METHODS
from cl_service.run import LocalTrainer, run_stream

pytestmark = pytest.mark.timeout(600)


def _cfg(out, tiny_base, dcl_shards, extra=()):
    return load_run_cfg(None, [
        f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]",
        f"methods=[{','.join(METHODS.names())}]", "expert.train.max_steps=3", "expert.train.batch_size=4",
        "router.train.max_steps=3", "router.samples_per_task=4", "replay.samples_per_task=2",
        "expert.lora.rank=4", "router.lora.rank=4", "clmoe.experts=2", "modalprompt.prompts=4",
        "modalprompt.train.max_steps=3", "modalprompt.train.batch_size=4", "eval.max_new_tokens=3", "ray.num_workers=0",
        *extra])


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base, dcl_shards):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    base_before = _digest(Path(tiny_base))
    logs: list[str] = []
    metrics = run_stream(_cfg(out, tiny_base, dcl_shards), LocalTrainer(), log=logs.append)
    return {"out": out, "metrics": metrics, "logs": logs, "base_before": base_before}


@pytest.mark.parametrize("method", METHODS.names())
def test_method_contract(run, method):
    m = run["metrics"]["methods"][method]
    cls = METHODS.get(method)
    assert isinstance(cls.serving, (str, type(None))) and cls.__doc__  # says whether clsvc serve serves it; described
    assert len(m["matrix"]) == 2 and all(len(r) == 2 for r in m["matrix"])
    rows = [1] if method == "joint" else [0, 1]
    for i in rows:
        assert all(0 <= v <= 100 for v in m["matrix"][i])
    assert math.isfinite(m["MFT"])
    if METHODS.get(method).routed:
        assert set(m["router_accuracy"]) == {"RS", "Med"}
        assert m["router_ms_per_request"] > 0
    preds = run["out"] / "predictions" / method
    lines = [json.loads(line) for f in sorted(preds.rglob("*.jsonl")) for line in f.read_text().splitlines()]
    assert lines and {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(lines[0])


def test_adapters_hold_only_adapter_weights_and_finite_losses(run):
    from safetensors import safe_open

    folders = [p.parent for p in (run["out"] / "adapters").rglob("adapter.json")]
    kinds = {json.loads((f / "adapter.json").read_text())["kind"] for f in folders}
    assert kinds == {"expert", "router", "sequential", "joint", "olora", "moelora", "clmoe", "modalprompt", "tasklora",
                     "sefe", "keeplora"}
    for f in folders:
        log = json.loads((f / "train_log.json").read_text())
        assert log["steps"] == 3 and all(math.isfinite(x) for x in log["losses"])
        with safe_open(str(f / "adapter_model.safetensors"), "pt") as st:
            keys = list(st.keys())
        if (f / "moelora_config.json").is_file():  # experts and gates of decoder Linears only
            assert keys and all(".language_model." in k and k.rsplit(".", 1)[1] in ("A", "B", "gate")
                                for k in keys), keys[:5]
        elif (f / "modalprompt_config.json").is_file():  # every seen task's prompt rows and transform, no LoRA
            assert keys and all(k.split(".")[0] in ("prompts", "transforms") for k in keys), keys[:5]
        else:
            assert keys and all(("lora_" in k) or ("multi_modal_projector" in k) for k in keys), keys[:5]


def test_moelora_continues_its_experts_stage_to_stage_and_reloads_to_identical_logits(run, tiny_base, dcl_shards):
    from safetensors.torch import load_file

    from cl_service.adapters.moelora import moelora_active, read_spec
    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine
    from cl_service.models.mllm import load_mllm

    ads = run["out"] / "adapters" / "moelora"
    s0, s1 = ads / "stage-0-RS", ads / "stage-1-Med"
    spec = read_spec(s1)
    assert read_spec(s0) == spec and spec.experts == 4 and spec.rank == 4
    w0, w1 = load_file(str(s0 / "adapter_model.safetensors")), load_file(str(s1 / "adapter_model.safetensors"))
    assert set(w0) == set(w1)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # stage 1 trained on
    k = next(k for k in w0 if k.endswith(".B"))
    assert w0[k].shape[0] == 4 and w0[k].shape[2] == 1  # four experts of rank 4 / 4
    assert w0[k].abs().sum() > 0  # trained away from B = 0
    samples = ShardDataset(dcl_shards).samples("Med", "test")[:3]
    mllm = load_mllm(tiny_base)
    mllm.model.eval()
    with torch.no_grad():
        plain = mllm.forward(mllm.collate(samples, train=False)).logits
        with moelora_active(mllm, s1):
            a = mllm.forward(mllm.collate(samples, train=False)).logits
        with moelora_active(mllm, s1):
            b = mllm.forward(mllm.collate(samples, train=False)).logits
        after = mllm.forward(mllm.collate(samples, train=False)).logits
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert torch.equal(after, plain)  # hooks removed on exit
    engine = Engine(tiny_base)  # the engine answers through the same hooks, as the run evaluated it
    assert engine.answer(samples, str(s1), 3) == engine.answer(samples, str(s1), 3)
    with pytest.raises(ValueError, match="mixed batches"):
        engine.answer_mixed(samples, [str(s1)] * len(samples), 3)


def test_base_checkpoint_never_changes(run, tiny_base):
    assert _digest(Path(tiny_base)) == run["base_before"]


def test_saved_adapter_reloads_to_identical_logits(tmp_path, tiny_base, dcl_shards):
    from cl_service.adapters.lora import LoraCfg, load_adapter
    from cl_service.data.shards import ShardDataset
    from cl_service.models.mllm import load_mllm
    from cl_service.train.job import DataPart, TrainJob
    from cl_service.train.loop import TrainCfg
    from cl_service.train.runner import run_train_job

    batch_src = ShardDataset(dcl_shards).samples("RS", "test")[:4]
    seen = {}

    def capture(mllm):
        mllm.model.eval()
        with torch.no_grad():
            seen["logits"] = mllm.forward(mllm.collate(batch_src, train=False)).logits

    job = TrainJob(name="expert/RS", kind="expert", task="RS", out_dir=str(tmp_path / "e"), base_path=str(tiny_base),
                   dataset=str(dcl_shards), parts=(DataPart("RS"),), lora=LoraCfg(rank=4, alpha=8),
                   train=TrainCfg(lr=1e-2, max_steps=3, batch_size=4))
    run_train_job(job, on_done=capture)
    fresh = load_mllm(tiny_base)
    load_adapter(fresh, tmp_path / "e", "x")
    fresh.model.eval()
    with torch.no_grad():
        again = fresh.forward(fresh.collate(batch_src, train=False)).logits
    assert torch.equal(seen["logits"], again)
    base = load_mllm(tiny_base)
    with torch.no_grad():
        plain = base.forward(base.collate(batch_src, train=False)).logits
    assert not torch.equal(plain, again)  # the adapter does change the outputs


def test_rerun_skips_finished_stages_and_reproduces_metrics(run, tiny_base, dcl_shards):
    logs: list[str] = []
    again = run_stream(_cfg(run["out"], tiny_base, dcl_shards), LocalTrainer(), log=logs.append)
    assert not any("trained" in line and "already" not in line for line in logs), logs
    assert json.dumps(again, sort_keys=True) == json.dumps(run["metrics"], sort_keys=True)


def test_run_killed_mid_stage_resumes_with_same_metrics(run, tmp_path, tiny_base, dcl_shards):
    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    # As if killed during stage 2: its evaluation records and some of its adapters are not there yet,
    # and one adapter was caught half-written (no adapter.json).
    shutil.rmtree(out / "stages")
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "adapters" / "experts" / "Med")
    (out / "adapters" / "lora_ft" / "stage-1-Med" / "adapter.json").unlink()
    shutil.rmtree(out / "adapters" / "tasklora-r2" / "stage-1-Med")  # hide's and disco's Med LoRA (rank 4 / 2 tasks)
    logs: list[str] = []
    again = run_stream(_cfg(out, tiny_base, dcl_shards), LocalTrainer(), log=logs.append)
    trained = [line for line in logs if "trained" in line and "already" not in line]
    assert len(trained) == 1 and "expert/Med" in trained[0] and "lora_ft/stage-1" in trained[0]
    assert "tasklora-r2/stage-1" in trained[0] and "tasklora-r2_replay" not in trained[0]
    assert "router" not in trained[0]
    for name, m in run["metrics"]["methods"].items():
        assert again["methods"][name]["matrix"] == m["matrix"], name


def test_dry_run_plan_names_exactly_the_missing_work(run, tmp_path, tiny_base, dcl_shards):
    from cl_service.run import plan_stream

    done = plan_stream(_cfg(run["out"], tiny_base, dcl_shards))
    assert [p["task"] for p in done] == ["RS", "Med"]
    assert all(not p["train"] and not p["copies"] and not p["evaluate"] for p in done), done
    assert "expert/Med" in done[1]["trained"] and "router/stage-1" in done[1]["trained"]
    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    shutil.rmtree(out / "adapters" / "experts" / "Med")
    (out / "stages" / "zero_shot" / "stage-1-Med.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    plan = plan_stream(_cfg(out, tiny_base, dcl_shards))
    assert plan[0]["train"] == [] and plan[0]["evaluate"] == []
    assert plan[1]["train"] == ["expert/Med"] and "zero_shot" in plan[1]["evaluate"]
    # evaluations that used the missing expert are re-run; the others are kept
    assert "oracle" in plan[1]["evaluate"] and "lora_ft" not in plan[1]["evaluate"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a plan writes nothing


def test_identical_jobs_train_once(run):
    """lora_ft / lora_ft_replay / olora / olora_replay / sefe / sefe_replay stage 0 train exactly the first expert's
    weights, and a replay variant's stage 0 (nothing earlier to replay) its method's: trained once, cloned."""
    from cl_service.adapters.registry import read_adapter

    ads = run["out"] / "adapters"
    expert = read_adapter(ads / "experts" / "RS")
    for name in ("lora_ft", "lora_ft_replay", "olora", "olora_replay", "sefe", "sefe_replay"):
        clone = read_adapter(ads / name / "stage-0-RS")
        assert clone["files"]["adapter_model.safetensors"] == expert["files"]["adapter_model.safetensors"]
        assert clone["id"] != expert["id"] and clone["kind"] == "sequential"
        assert clone["cloned_from"] == expert["id"]
    for name in ("moelora", "clmoe", "modalprompt", "keeplora"):
        clone = read_adapter(ads / f"{name}_replay" / "stage-0-RS")
        assert clone["cloned_from"] == f"{name}:stage-0" and clone["kind"] == name
    # 6 before; modalprompt_replay's stage 0 is a copy of modalprompt's; hide and disco share their task LoRAs (one
    # job each), and their replay rows' stage 0 is a copy of it; sefe's and keeplora's (3)
    assert sum("published without training" in line for line in run["logs"]) == 6 + 1 + 1 + 3
    # stage 1 differs (lora_ft continues from stage 0 on Med; the Med expert starts from the base)
    assert read_adapter(ads / "lora_ft" / "stage-1-Med")["files"]["adapter_model.safetensors"] != \
        read_adapter(ads / "experts" / "Med")["files"]["adapter_model.safetensors"]


def test_olora_grows_one_orthogonal_block_per_task_and_keeps_old_blocks(run):
    """Stage 1 of olora: rank doubles, the stage-0 block is copied unchanged, the new block is trained."""
    from safetensors.torch import load_file

    ads = run["out"] / "adapters" / "olora"
    s0, s1 = load_file(str(ads / "stage-0-RS" / "adapter_model.safetensors")), \
        load_file(str(ads / "stage-1-Med" / "adapter_model.safetensors"))
    c0 = json.loads((ads / "stage-0-RS" / "adapter_config.json").read_text())
    c1 = json.loads((ads / "stage-1-Med" / "adapter_config.json").read_text())
    r = c0["r"]
    assert c1["r"] == 2 * r and c1["lora_alpha"] / c1["r"] == c0["lora_alpha"] / c0["r"]
    assert set(s0) == set(s1)
    changed_new = False
    for k, v in s0.items():
        if ".lora_A." in k:
            assert torch.equal(s1[k][:r], v)
            changed_new |= not torch.equal(s1[k][r:], torch.zeros_like(s1[k][r:]))
        elif ".lora_B." in k:
            assert torch.equal(s1[k][:, :r], v)
        else:  # the projector copy is the first task's, frozen
            assert torch.equal(s1[k], v)
    assert changed_new


def test_extending_the_stream_reuses_adapters_and_reevaluates_on_the_new_task(run, tmp_path, tiny_base, dcl_shards):
    """Resuming with a longer data.tasks list: finished stages keep their adapters (nothing retrained) but are
    evaluated again on the new task, so the matrix is square and its old entries are unchanged."""
    out = tmp_path / "longer"
    shutil.copytree(run["out"], out)
    logs: list[str] = []
    methods = ["oracle", "lora_ft", "zero_shot"]
    again = run_stream(_cfg(out, tiny_base, dcl_shards, ["data.tasks=[RS,Med,AD]", f"methods=[{','.join(methods)}]"]),
                       LocalTrainer(), log=logs.append)
    trained = [line for line in logs if "trained" in line and "already" not in line]
    assert len(trained) == 1 and trained[0].startswith("[stage 3/3 AD]"), trained
    for name in methods:
        new, old = again["methods"][name]["matrix"], run["metrics"]["methods"][name]["matrix"]
        assert len(new) == 3 and all(len(r) == 3 for r in new)
        assert [r[:2] for r in new[:2]] == old, name
        assert all(math.isfinite(v) for v in new[0] + new[1])  # stages 1-2 now scored on AD too


def test_router_augment_trains_and_fits_routers_on_jittered_copies_too(tmp_path, tiny_base, dcl_shards):
    """``router.augment=1``: the MLLM router trains on twice its samples, the feature routers fit on them."""
    from cl_service.routers.store import ROUTER_META

    out = tmp_path / "aug"
    run_stream(_cfg(out, tiny_base, dcl_shards, ["methods=[mrlora,mrlora_proto]", "router.augment=1"]),
               LocalTrainer(), log=lambda s: None)
    log = json.loads(next((out / "adapters" / "router").rglob("train_log.json")).read_text())
    assert log["samples"] == 2 * 2 * 4  # 2 tasks x 4 samples, each with one jittered copy
    meta = json.loads((out / "routers" / "prototype" / "stage-1-Med" / ROUTER_META).read_text())
    assert meta["augment"] == 1 and meta["experts"] == ["RS", "Med"]


def test_run_writes_tensorboard_scalars_of_every_step_evaluation_and_final_metric(run):
    """The default tracker (TensorBoard): per step of every trained job from its train_log.json, per (method,
    stage) evaluation, the final CL metrics; read back from the event files."""
    from cl_service.tracking.backends import read_tensorboard_scalars

    logdirs = {p.parent for p in (run["out"] / "tracking").rglob("events.out.tfevents.*")}
    assert logdirs == {run["out"] / "tracking" / run["out"].name}
    got = read_tensorboard_scalars(run["out"] / "tracking")  # (a rerun of the folder adds only final/ values)
    trained = [json.loads((f.parent / "train_log.json").read_text()) for f in (run["out"] / "adapters").rglob("adapter.json")
               if "cloned_from" not in json.loads(f.read_text())]
    assert len(trained) >= 8
    for log in trained:
        p = f"train/{log['job']}"
        assert [s for s, _ in got[f"{p}/loss"]] == [1, 2, 3]
        assert [v for _, v in got[f"{p}/loss"]] == pytest.approx(log["losses"], rel=1e-6)
        assert all(v > 0 for _, v in got[f"{p}/lr"]) and all(v > 0 for _, v in got[f"{p}/tokens_per_s"])
    assert {t.split("/")[0] for t in got} == {"train", "eval", "final"}
    for name, m in run["metrics"]["methods"].items():
        assert sorted({s for s, _ in got[f"eval/{name}/eval_s"]}) == [1, 2]
        final = dict(got[f"final/{name}/MFT"])
        assert list(final) == [2] and final[2] == pytest.approx(m["MFT"], rel=1e-6)
        assert dict(got[f"eval/{name}/acc/Med"])[2] == pytest.approx(m["matrix"][1][1], rel=1e-6)
        if m.get("router_accuracy"):
            assert dict(got[f"eval/{name}/router_acc/RS"])[2] == pytest.approx(m["router_accuracy"]["RS"], rel=1e-6)


def test_report_shows_a_loss_curve_per_adapter_family(run):
    import re

    report = (run["out"] / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert all((run["out"] / p).is_file() and (run["out"] / p).stat().st_size > 1000 for p in pngs)
    families = {p.name for p in (run["out"] / "adapters").iterdir() if p.is_dir()}
    assert {p for p in pngs if p.startswith("loss_")} == {f"loss_{f}.png" for f in families}
    assert {"experts", "router", "lora_ft"} <= families


@pytest.mark.parametrize("method", ["sefe", "keeplora", "sefe_replay"])
def test_merging_methods_refuse_weight_decay_before_anything_trains(tmp_path, tiny_base, dcl_shards, method):
    """Weight decay would move the merged blocks of earlier tasks: refused at the first stage, with nothing trained
    (not after a first stage that cannot be continued)."""
    from cl_service.config import load_run_cfg
    from cl_service.run import LocalTrainer, run_stream

    cfg = load_run_cfg(None, [f"out={tmp_path}", f"data.path={dcl_shards}", f"base.path={tiny_base}",
                              "data.tasks=[RS,Med]", f"methods=[{method}]", "expert.train.weight_decay=0.01",
                              "expert.train.max_steps=1", "expert.lora.rank=4", "ray.num_workers=0"])
    with pytest.raises(ValueError, match=f"{method.removesuffix('_replay')} needs expert.train.weight_decay=0"):
        run_stream(cfg, LocalTrainer(), log=lambda *_: None)
    assert not list(tmp_path.rglob("adapter.json"))
