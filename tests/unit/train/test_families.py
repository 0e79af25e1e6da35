"""The adapter-family seam of the job runner: every family resumes exactly from a checkpoint; a family's preparation
pass, batch loss term, own training state and extra saved files go through the runner as its docstring says; a
family whose trainable parameters the model does not hold is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, Attached, JobData, family, running_mean
from cl_service.adapters.lora import LORA, LoraCfg
from cl_service.adapters.registry import read_adapter
from cl_service.train import runner
from cl_service.train.job import DataPart, TrainJob, job_options
from cl_service.train.loop import TrainCfg

pytestmark = pytest.mark.timeout(300)

PAPER = job_options(paper=True, beta=0.5, momentum=0.7, top_k=1)
PROMPTS = job_options(prompts=3)
TASK_FEATURES = job_options(features="routing")
SEFE = job_options(key_fraction=0.02, reg_weight=2.5e3)
KEEP = job_options(grad_fraction=0.5, base_energy=0.6, task_energy=0.99)


def _job(tmp_path, base, data, kind, name, task="RS", init=None, steps=4, lora=LoraCfg(rank=4, alpha=8), **kw):
    return TrainJob(name=f"{kind}/{name}", kind=kind, task=task, out_dir=str(tmp_path / name), base_path=str(base),
                    dataset=str(data), parts=(DataPart(task, limit=8),), lora=lora,
                    train=TrainCfg(lr=1e-2, max_steps=steps, batch_size=4), init_adapter=init, description=name, **kw)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def _resumed_equals_uninterrupted(tmp_path, job) -> None:
    """Train ``job`` whole (checkpointing at step 2), then again from that checkpoint: same losses, same files."""
    ckpt = tmp_path / f"ckpt-{Path(job.out_dir).name}"
    ckpt.mkdir()

    def keep(step, loss, save):
        if step == 2:
            save(ckpt)

    whole = runner.run_train_job(job, on_checkpoint=keep, checkpoint_every=2)
    resume = runner.load_resume(ckpt)
    assert resume is not None and resume["state"].step == 2
    again = job.replace(out_dir=job.out_dir + "-resumed")
    runner.run_train_job(again, resume=resume)
    log = json.loads((Path(again.out_dir) / "train_log.json").read_text())
    assert log["resumed_from_step"] == 2 and log["losses"] == whole.losses
    for f in Path(job.out_dir).iterdir():  # every published file, the family's own ones included
        if f.suffix == ".safetensors":
            a, b = load_file(str(f)), load_file(str(Path(again.out_dir) / f.name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, tiny_base, dcl_shards):
    """First-stage adapters the continuing families start from: a LoRA, a MoE-LoRA, a CL-MoE with task gates,
    ModalPrompt's first task's prompts, a task LoRA with its feature means and projector, and a KeepLoRA block with
    its protected subspace."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage0")
    out = {}
    for kind, extra in (("expert", {}), ("moelora", {"moe_experts": 2}), ("clmoe", {"moe_experts": 2, "options": PAPER}),
                        ("modalprompt", {"options": PROMPTS, "lora": None}), ("tasklora", {"options": TASK_FEATURES}),
                        ("keeplora", {"options": KEEP})):
        job = _job(root, tiny_base, dcl_shards, kind, f"{kind}-0", steps=2, **extra)
        runner.run_train_job(job)
        out[kind] = job.out_dir
    return out


@pytest.mark.parametrize("kind", ["expert", "sequential", "olora", "moelora", "clmoe", "modalprompt", "tasklora", "sefe",
                                  "keeplora"])
def test_every_family_resumes_exactly_from_a_checkpoint(tmp_path, tiny_base, dcl_shards, stage0, kind):
    """Trainable weights come back by name (the O-LoRA's frozen rows, the MoE-LoRA's gates, the new task's prompt rows
    and transform, the task LoRA's projector continued from the previous task's), the preparation pass is rerun to
    the same result (CL-MoE's task gates, ModalPrompt's features, the task LoRA's feature means, SEFE's key
    positions, KeepLoRA's frozen A), and what the family saves is what an uninterrupted run saves (KeepLoRA's grown
    protected subspace included)."""
    init = {"expert": None, "sequential": stage0["expert"], "olora": stage0["expert"], "moelora": stage0["moelora"],
            "clmoe": stage0["clmoe"], "modalprompt": stage0["modalprompt"], "tasklora": stage0["tasklora"],
            "sefe": stage0["expert"], "keeplora": stage0["keeplora"]}[kind]
    extra = {"olora": {"orth_lambda": 0.5}, "moelora": {"moe_experts": 2},
             "clmoe": {"moe_experts": 2, "options": PAPER}, "modalprompt": {"options": PROMPTS, "lora": None},
             "tasklora": {"options": TASK_FEATURES}, "sefe": {"options": SEFE}, "keeplora": {"options": KEEP}}.get(kind, {})
    job = _job(tmp_path, tiny_base, dcl_shards, kind, f"{kind}-1", task="Med", init=init, **extra)
    _resumed_equals_uninterrupted(tmp_path, job)


class AnchoredLoRA:
    """A family made for this test: a LoRA plus a trainable probe vector drawn toward each batch's mean token
    embedding (a batch loss term), a per-task anchor (the preparation pass: the mean token embedding of all the
    job's samples) and the running mean of the batches seen while training (its own state), all saved."""

    name = "anchored"
    reuses_base = True

    @staticmethod
    def _embed(mllm, batch) -> torch.Tensor:
        emb = mllm.model.get_input_embeddings()(batch["input_ids"].to(mllm.device))
        return emb[batch["attention_mask"].bool()]

    def prepare(self, job, mllm, data: JobData):
        with torch.no_grad():
            return running_mean(self._embed(mllm, b) for b in data.batches())

    def attach(self, job, mllm, anchor) -> Attached:
        params = LORA.attach(job, mllm, None).params
        mllm.model.probe = torch.nn.Parameter(torch.zeros_like(anchor))
        seen = {"sum": torch.zeros_like(anchor, dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)}

        def batch_loss(batch):
            rows = self._embed(mllm, batch).detach()
            seen["sum"] += rows.double().sum(0)
            seen["n"] += rows.shape[0]
            return (mllm.model.probe - rows.mean(0)).pow(2).mean()

        def load_state(d):
            seen["sum"], seen["n"] = d["sum"].clone(), d["n"].clone()

        return Attached(params + [mllm.model.probe], batch_loss=batch_loss, state=lambda: dict(seen),
                        load_state=load_state, extra={"anchor": anchor, "seen": seen})

    def save(self, job, mllm, folder, attached) -> None:
        LORA.save(job, mllm, folder, attached)
        seen = attached.extra["seen"]
        save_file({"anchor": attached.extra["anchor"].contiguous(), "probe": mllm.model.probe.detach().contiguous(),
                   "seen_sum": seen["sum"].contiguous(), "seen_n": seen["n"].reshape(1)},
                  str(Path(folder) / "anchors.safetensors"))

    def release(self, mllm) -> None:
        del mllm.model.probe
        LORA.release(mllm)


def test_a_familys_prepare_pass_batch_loss_state_and_files_go_through_the_runner(tmp_path, tiny_base, dcl_shards,
                                                                                 monkeypatch):
    from cl_service.models.mllm import load_mllm
    from cl_service.train.job import load_parts

    monkeypatch.setitem(FAMILIES._items, "anchored", AnchoredLoRA())
    assert family("anchored").name == "anchored"
    job = _job(tmp_path, tiny_base, dcl_shards, "anchored", "a", steps=4)
    _resumed_equals_uninterrupted(tmp_path, job)  # the seen mean after a resume only matches with the state back
    meta = read_adapter(job.out_dir)
    assert "anchors.safetensors" in meta["files"] and meta["kind"] == "anchored"  # checksummed with the adapter
    saved = load_file(str(Path(job.out_dir) / "anchors.safetensors"))
    mllm = load_mllm(tiny_base)
    rows = [AnchoredLoRA._embed(mllm, mllm.collate([s], train=True)) for s in load_parts(job)]
    assert torch.allclose(saved["anchor"], torch.cat(rows).mean(0), atol=1e-6)  # over all 8 samples
    assert saved["probe"].abs().sum() > 0  # the batch term trained it: its only gradient
    # 4 steps of batch 4 over 8 samples: each sample seen twice (a resumed run counts the first two steps only
    # through the state it got back), so the running mean is the anchor again
    n_tokens = sum(r.shape[0] for r in rows)
    assert saved["seen_n"].item() == 2 * n_tokens
    assert torch.allclose((saved["seen_sum"] / saved["seen_n"]).float(), saved["anchor"], atol=1e-5)
    kept = runner._BASE_CACHE[runner._base_key(job, torch.device("cpu"))][0]
    assert not hasattr(kept.model, "probe") and kept.peft is None  # released: the next job gets the plain base


def test_a_family_whose_parameters_the_model_does_not_hold_is_refused(tmp_path, tiny_base, dcl_shards, monkeypatch):
    class Stray:
        name = "stray"
        reuses_base = False

        def attach(self, job, mllm, prepared):
            return Attached([torch.nn.Parameter(torch.zeros(3))])

        def save(self, *a):
            raise AssertionError("never reached")

    monkeypatch.setitem(FAMILIES._items, "stray", Stray())
    with pytest.raises(ValueError, match="stray: 1 of 1 trainable parameters are not .* under mllm.model"):
        runner.run_train_job(_job(tmp_path, tiny_base, dcl_shards, "stray", "s", steps=1))
    assert not (tmp_path / "s").exists()


def test_job_data_offers_the_jobs_samples_in_order_and_seeded_subsets():
    data = JobData(list(range(10)), lambda samples, train: {"ids": samples, "train": train}, batch_size=4)
    assert [b["ids"] for b in data.batches()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b["train"] for b in data.batches(train=False)] == [False] * 3
    sub = data.subset(0.2, seed=3)
    assert len(sub) == 2 and sub == sorted(sub) and sub == data.subset(0.2, seed=3) and len(data.subset(0.01)) == 1
    with pytest.raises(ValueError, match="fraction=0 is out of range"):
        data.subset(0)
    assert torch.equal(running_mean(iter([torch.ones(2, 3), torch.zeros(1, 3)])), torch.full((3,), 2 / 3))


def test_an_unknown_kind_names_the_known_families():
    with pytest.raises(KeyError, match="unknown adapter family .*'nope'; known: clmoe, expert, joint, keeplora, modalprompt"):
        family("nope")
