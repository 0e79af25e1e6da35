"""``hide`` (HiDe-LLaVA) and ``disco`` (DISCO) through the CLI, the job runner and the engine: their per-task jobs
(trained once for both, each task's LoRA alone, the projector carried on, the task's feature means saved), their
per-request weights against hand-computed cosines, their answers against the mixture they describe, the replay
variants, ``--dry-run``, ``clsvc ls methods`` and ``clsvc serve``'s refusal."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cl_service.adapters import tasklora
from cl_service.adapters.family import JobData, family
from cl_service.adapters.lora import LoraCfg
from cl_service.adapters.registry import AdapterError, read_adapter
from cl_service.train.job import DataPart, TrainJob, job_options, load_parts
from cl_service.train.loop import TrainCfg
from cl_service.train.runner import run_train_job

pytestmark = pytest.mark.timeout(600)

METHODS = "hide,disco,hide_replay,disco_replay"


def _cli(args: list[str]) -> tuple[int, str, str]:
    from cl_service.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base, dcl_shards):
    """A 2-task run of the four methods through ``clsvc run`` (its ``--dry-run`` first), in this process."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hide-disco")
    out = root / "run"
    overrides = [f"data.path={dcl_shards}", f"base.path={tiny_base}", "data.tasks=[RS,Med]", "expert.lora.rank=4",
                 "expert.lora.alpha=8", "expert.train.max_steps=2", "expert.train.batch_size=4", "data.train_limit=6",
                 "data.test_limit=3", "eval.max_new_tokens=3", "replay.samples_per_task=2", "ray.num_workers=0"]
    args = ["run", "--out", str(out), "--methods", METHODS, *overrides]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLSVC_HOME", str(root / "home"))
        rc, plan, _ = _cli(args + ["--dry-run"])
        assert rc == 0 and not out.exists()
        rc, log, err = _cli(args)
        assert rc == 0, err[-2000:]
    return {"out": out, "plan": plan, "log": log, "overrides": overrides,
            "metrics": json.loads((out / "metrics.json").read_text())}


def test_dry_run_lists_one_job_per_task_trained_once_for_hide_and_disco(run):
    """hide and disco (rank 4 / 2 tasks each) share their task LoRAs: one job per task, and one per task of their
    replay rows, whose first one (nothing earlier to replay) is a copy."""
    rows = {}
    stage = None
    for line in run["plan"].splitlines():
        if line.startswith("stage "):
            stage = line.split(":")[0]
        elif stage and line.strip():
            what, _, names = line.strip().partition("   ")
            rows[(stage, what.strip())] = names.strip()
    assert rows[("stage 1 RS", "train")] == "tasklora-r2/stage-0", rows
    assert rows[("stage 1 RS", "copy of an identical job")] == "tasklora-r2_replay/stage-0"
    assert rows[("stage 2 Med", "train")] == "tasklora-r2/stage-1, tasklora-r2_replay/stage-1"
    assert rows[("stage 2 Med", "evaluate")] == "hide, disco, hide_replay, disco_replay"


def test_each_task_lora_is_trained_once_and_only_its_own(run):
    """Every stage folder holds one task's LoRA of rank 4 / 2 tasks, scale alpha / r kept; stage 1 is a new LoRA (not
    stage 0's trained on); the replay rows' stage 0 is a copy, their stage 1 their own."""
    ads = run["out"] / "adapters"
    assert sorted(p.name for p in ads.iterdir()) == ["tasklora-r2", "tasklora-r2_replay"]
    s0, s1 = read_adapter(ads / "tasklora-r2" / "stage-0-RS"), read_adapter(ads / "tasklora-r2" / "stage-1-Med")
    assert s0["kind"] == s1["kind"] == "tasklora" and "cloned_from" not in s1
    r0, r1 = (read_adapter(ads / "tasklora-r2_replay" / d) for d in ("stage-0-RS", "stage-1-Med"))
    assert r0["files"] == s0["files"] and r0["cloned_from"] == "tasklora-r2:stage-0"
    assert "cloned_from" not in r1 and r1["files"] != s1["files"]
    log = json.loads((ads / "tasklora-r2_replay" / "stage-1-Med" / "train_log.json").read_text())
    assert log["samples"] == 6 + 2  # Med's 6 and 2 replayed RS samples
    cfg = json.loads((ads / "tasklora-r2" / "stage-1-Med" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4.0  # expert.lora.rank 4 over 2 tasks, alpha / r = 2
    w0 = load_file(str(ads / "tasklora-r2" / "stage-0-RS" / "adapter_model.safetensors"))
    w1 = load_file(str(ads / "tasklora-r2" / "stage-1-Med" / "adapter_model.safetensors"))
    assert w0.keys() == w1.keys()
    assert all(w0[k].abs().sum() > 0 and w1[k].abs().sum() > 0 for k in w0 if ".lora_B." in k)
    assert all(not torch.equal(w0[k], w1[k]) for k in w0 if ".lora_A." in k)  # a fresh LoRA per task
    # the replay row's features are its own task's: the same as without replay
    for d in ("stage-0-RS", "stage-1-Med"):
        a, b = (tasklora.read_task_features(ads / g / d) for g in ("tasklora-r2", "tasklora-r2_replay"))
        assert a.task == b.task and torch.equal(a.text, b.text) and torch.equal(a.image, b.image)


def test_a_task_lora_job_continues_the_projector_and_measures_its_own_tasks_features(tmp_path, tiny_base, dcl_shards):
    """The projector copy a stage-1 job starts from is stage 0's (trained on from there); its feature means are the
    mean routing features of its own task's samples only (the replayed RS samples left out), saved and read back."""
    from cl_service.models.mllm import load_mllm

    torch.set_num_threads(1)
    lora = LoraCfg(rank=2, alpha=4, dropout=0.0)
    opts = job_options(features=tasklora.ROUTING_FEATURES)

    def job(name, task, parts, init=None):
        return TrainJob(name=f"hide/{name}", kind="tasklora", task=task, out_dir=str(tmp_path / name),
                        base_path=str(tiny_base), dataset=str(dcl_shards), parts=parts, lora=lora,
                        train=TrainCfg(lr=1e-2, max_steps=2, batch_size=4), init_adapter=init, options=opts)

    s0 = job("stage-0", "RS", (DataPart("RS", limit=6),))
    s1 = job("stage-1", "Med", (DataPart("Med", limit=6), DataPart("RS", limit=3, seed=1)), init=s0.out_dir)
    run_train_job(s0)
    files0 = read_adapter(s0.out_dir)["files"]
    fam = family("tasklora")
    mllm = load_mllm(tiny_base)
    samples = load_parts(s1)
    prepared = fam.prepare(s1, mllm, JobData(samples, mllm.collate, 4))
    attached = fam.attach(s1, mllm, prepared)
    projector0 = tasklora._projector_tensors(s0.out_dir)
    start = mllm.model.get_submodule("model.multi_modal_projector").modules_to_save["job"].state_dict()
    assert start.keys() == projector0.keys() and all(torch.equal(start[k], projector0[k]) for k in start)
    trainable = {n for n, p in mllm.model.named_parameters() if p.requires_grad}
    assert trainable and {id(p) for p in attached.params} == {id(p) for n, p in mllm.model.named_parameters()
                                                              if p.requires_grad}
    assert all(".lora_A.job." in n or ".lora_B.job." in n or ".modules_to_save.job." in n for n in trainable)
    fam.release(mllm)

    run_train_job(s1)
    assert read_adapter(s0.out_dir)["files"] == files0  # the earlier task's files untouched
    assert not all(torch.equal(v, tasklora._projector_tensors(s1.out_dir)[k]) for k, v in projector0.items())
    med = [s for s in samples if s.task == "Med"]
    assert len(med) == 6 and len(samples) == 9
    want = mllm.routing_features(med, 64).double().mean(0).float()
    got = tasklora.read_task_features(s1.out_dir)
    h = mllm.hidden_size
    assert got.task == "Med" and got.samples == 6
    torch.testing.assert_close(got.text, want[:h], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.image, want[h:], rtol=1e-5, atol=1e-6)
    # a changed feature file is refused, not used
    (Path(s1.out_dir) / tasklora.FEATURES).write_bytes((Path(s0.out_dir) / tasklora.FEATURES).read_bytes())
    with pytest.raises(AdapterError, match="task_features.safetensors .*checksum"):
        tasklora.read_task_features(s1.out_dir)


def test_hide_and_disco_weights_are_the_references_softmax_of_hand_computed_cosines():
    """HiDe: softmax((cos(image, image anchor) + cos(text, text anchor)) / 2 / 0.1); DISCO: softmax(cos(text, text
    prototype) / 0.05); per request (row), computed here with torch's own cosine_similarity and softmax."""
    from cl_service.adapters.tasklora import TaskFeatures
    from cl_service.methods.disco import Disco
    from cl_service.methods.hide import HiDe

    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    means = [TaskFeatures(f"t{i}", torch.randn(8, generator=g), torch.randn(5, generator=g), 10) for i in range(4)]
    ta = torch.stack([m.text for m in means]).double()
    ia = torch.stack([m.image for m in means]).double()
    s = (F.cosine_similarity(image[:, None], ia[None], dim=2) + F.cosine_similarity(text[:, None], ta[None], dim=2)) / 2
    hide = HiDe.weights(text.numpy(), image.numpy(), means)
    np.testing.assert_allclose(hide, torch.softmax(s / 0.1, dim=1).numpy(), rtol=1e-6, atol=1e-9)
    disco = Disco.weights(text.numpy(), image.numpy(), means)
    want = torch.softmax(F.cosine_similarity(text[:, None], ta[None], dim=2) / 0.05, dim=1).numpy()
    np.testing.assert_allclose(disco, want, rtol=1e-6, atol=1e-9)
    assert disco.shape == (3, 4) and np.allclose(disco.sum(1), 1)
    assert not np.allclose(disco[0], disco[1]) and not np.allclose(hide[0], hide[1])  # each request its own weights
    # DISCO ignores the image: another image leaves its weights alone, HiDe's move
    np.testing.assert_allclose(Disco.weights(text.numpy(), -image.numpy(), means), disco)
    assert not np.allclose(HiDe.weights(text.numpy(), -image.numpy(), means), hide)


@pytest.mark.parametrize("method,mixed_from", [("hide", -1), ("disco", 0)])
def test_each_request_gets_its_own_weights_and_the_answer_of_that_mixture(run, tiny_base, dcl_shards, method,
                                                                          mixed_from):
    """At the last stage the method hands the engine, for each test item, the mixture of the two task LoRAs (HiDe:
    mixed in the last layer only; DISCO: in every layer; the images through the latest projector) with the weights
    of that item alone (its own features against the saved means, computed here); the answers it records are those
    of these mixtures, and an item answered alone gets the answer it got in its batch."""
    from cl_service.config import load_run_cfg
    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine
    from cl_service.methods import METHODS as REGISTRY
    from cl_service.methods.base import StageContext

    out = run["out"]
    folders = tuple(str(out / "adapters" / "tasklora-r2" / d) for d in ("stage-0-RS", "stage-1-Med"))
    means = [tasklora.read_task_features(f) for f in folders]
    assert [m.task for m in means] == ["RS", "Med"]
    recorded = {}
    for task in ("Med", "RS"):
        lines = (out / "predictions" / method / "stage-1-Med" / f"{task}.jsonl").read_text().splitlines()
        recorded.update({json.loads(x)["question_id"]: json.loads(x)["text"] for x in lines})
    ds = ShardDataset(dcl_shards)
    samples = [s for t in ("Med", "RS") for s in ds.samples(t, "test") if s.id in recorded]
    assert len(samples) == 6

    calls = []

    class Recording(Engine):
        def answer_mixture(self, samples, mixtures, *a, **kw):
            calls.append(list(mixtures))
            return super().answer_mixture(samples, mixtures, *a, **kw)

    cfg = load_run_cfg(None, [f"out={out}", *run["overrides"]])
    engine = Recording(tiny_base, cfg)  # eval.max_new_tokens as the run answered
    ctx = StageContext(1, ["RS", "Med"], {}, out, cfg, engine, {})
    answers = [a.text for a in REGISTRY.get(method)().predict(ctx, samples)]
    assert answers == [recorded[s.id] for s in samples]
    (mixtures,) = calls
    assert {(m.adapters, m.mixed_from, m.projector) for m in mixtures} == {(folders, mixed_from, folders[-1])}
    h = engine.text_dim
    ta, ia = torch.stack([m.text for m in means]).double(), torch.stack([m.image for m in means]).double()
    for s, m in zip(samples, mixtures):
        f = torch.from_numpy(engine.routing_features([s])).double()  # this item alone
        text_cos = F.cosine_similarity(f[:, :h], ta, dim=1)
        want = (torch.softmax((F.cosine_similarity(f[:, h:], ia, dim=1) + text_cos) / 2 / 0.1, 0) if method == "hide"
                else torch.softmax(text_cos / 0.05, 0))
        np.testing.assert_allclose(m.weights, want.numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(mixtures[0].weights, mixtures[3].weights)  # a Med and an RS item: weights of their own
    alone = [engine.answer_mixture([s], [m])[0] for s, m in zip(samples, mixtures)]
    assert alone == answers


def test_the_metrics_ls_and_serve_name_the_methods(run, tmp_path, monkeypatch, capsys):
    from cl_service.cli import main

    m = run["metrics"]["methods"]
    assert set(m) == set(METHODS.split(","))
    for name in m:
        assert len(m[name]["matrix"]) == 2 and all(0 <= v <= 100 for row in m[name]["matrix"] for v in row)
    assert main(["ls", "methods"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert all(any(line.split()[:1] == [n] for line in listing) for n in METHODS.split(",")), listing
    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    assert main(["serve", "--local", "--results", str(run["out"]), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds no complete expert adapter" in err and "hide is one answer from all its task LoRAs" in err
    assert "disco is one answer from all its task subspaces" in err and "disco_replay is" in err


def test_settings_the_references_cannot_run_are_refused_before_any_work(run, tmp_path, monkeypatch):
    """A rank that does not split over the stream's tasks, and vision-tower LoRA (the mixtures run over decoder
    Linears), are refused by ``--dry-run`` already, naming the setting; ``hide.rank`` set gives that rank."""
    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    def dry(methods, *extra):
        return _cli(["run", "--out", str(tmp_path / "r"), "--dry-run", "--methods", methods, *run["overrides"], *extra])

    rc, _, err = dry("hide", "expert.lora.rank=5")
    assert rc == 2 and "expert.lora.rank=5 does not split evenly over the stream's 2 tasks" in err
    assert "set hide.rank" in err
    rc, _, err = dry("disco", "expert.lora.rank=5")
    assert rc == 2 and "set disco.rank" in err
    rc, _, err = dry("disco", "expert.lora.vision=true")
    assert rc == 2 and "set expert.lora.vision=false" in err
    rc, plan, _ = dry("hide,disco", "expert.lora.rank=5", "hide.rank=3", "disco.rank=1")
    assert rc == 0 and "tasklora-r3/stage-0" in plan and "tasklora-r1/stage-0" in plan
    assert not (tmp_path / "r").exists()
