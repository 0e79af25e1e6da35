"""ModalPrompt's mechanism on hand-made numbers and tiny models: prompt rows inserted right after BOS (right and left
padding), the loss terms and the top-1 task choice against hand-computed cosines, each request of one batch answered
with its own task's prompts, and a job that trains only the new task's rows and transform."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cl_service.adapters.family import JobData
from cl_service.adapters.modalprompt import (ATTR, CONFIG, WEIGHTS, FeatureTable, ModalPromptFamily, PromptBank,
                                             alignment_loss, row_keys, scores)
from cl_service.models.mllm import IGNORE

pytestmark = pytest.mark.timeout(180)

P = 3


def _manual_insert(emb, mask, rows):
    """The expected sequences, built row by row: BOS, the rows, the rest; left padding stays in front."""
    out, masks = [], []
    for b in range(emb.shape[0]):
        first = int(mask[b].nonzero()[0])
        out.append(torch.cat([emb[b, :first + 1], rows[b], emb[b, first + 1:]]))
        masks.append(torch.cat([mask[b, :first + 1], torch.ones(rows.shape[1], dtype=mask.dtype), mask[b, first + 1:]]))
    return torch.stack(out), torch.stack(masks)


@pytest.mark.parametrize("train", [True, False], ids=["right-padded", "left-padded"])
def test_prompt_rows_sit_right_after_bos(build, samples, train):
    m = build()
    batch = m.collate(samples[:3], train=train)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding is tested
    rows = torch.randn(3, P, m.hidden_size)
    emb = m.embed(batch)
    want_emb, want_mask = _manual_insert(emb, batch["attention_mask"], rows)
    x = m.inputs(batch, rows=rows)
    assert torch.equal(x["inputs_embeds"], want_emb) and torch.equal(x["attention_mask"], want_mask)
    first = batch["attention_mask"].argmax(1)
    for b in range(3):
        assert batch["input_ids"][b, first[b]] == m.bos_id  # what the rows follow is BOS
        assert torch.equal(x["inputs_embeds"][b, first[b] + 1:first[b] + 1 + P], rows[b])
        kept = want_mask[b].bool()
        assert x["position_ids"][b, kept].tolist() == list(range(int(kept.sum())))  # BOS 0, the rows 1..P, ...
    if train:
        labels = x["labels"]
        assert (labels[:, 1:1 + P] == IGNORE).all()  # the rows are never a target
        assert torch.equal(torch.cat([labels[:, :1], labels[:, 1 + P:]], 1), batch["labels"])
    no_bos = dict(batch, input_ids=batch["input_ids"].clone())
    no_bos["input_ids"][1, first[1]] = m.bos_id + 1
    with pytest.raises(ValueError, match="right after BOS"):
        m.inputs(no_bos, rows=rows)


def test_the_training_hook_and_per_sample_rows_reach_the_decoder(build, samples):
    """The :attr:`soft_prompt` feeds forward and loss exactly the hand-built sequence; ``generate`` with per-sample
    rows answers each row as that sample alone does (its own rows, after its own BOS under left padding)."""
    m = build()
    batch = m.collate(samples[:3], train=True)
    rows = torch.randn(3, P, m.hidden_size)
    emb, mask = _manual_insert(m.embed(batch), batch["attention_mask"], rows)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.cat([batch["labels"][:, :1], torch.full((3, P), IGNORE), batch["labels"][:, 1:]], 1)
    with torch.no_grad():
        ref = m.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, labels=labels)
        m.soft_prompt = lambda b: rows
        got = m.forward(batch)
        loss = m.loss(batch)
        m.soft_prompt = None
        plain = m.forward(batch).logits
    assert torch.equal(got.logits, ref.logits) and plain.shape[1] + P == got.logits.shape[1]
    assert torch.allclose(loss, ref.loss, atol=1e-6)
    rows = rows * 20  # large enough to move the tiny model's answers
    together = m.generate(samples[:3], 5, prefix_rows=rows)
    alone = [m.generate([s], 5, prefix_rows=rows[i:i + 1])[0] for i, s in enumerate(samples[:3])]
    assert together == alone and together != m.generate(samples[:3], 5)


def test_the_loss_terms_are_the_formula_on_hand_made_features():
    # text_dim 2, image_dim 2: text [q, 0], image [0, v]
    feats = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 3.0, 0.0]])
    p = torch.tensor([1.0, 1.0, 1.0, 0.0])
    r3 = math.sqrt(3)
    cos_text = [1 / r3, 2 / (2 * r3)]   # [1,0,0,0].p / (1 |p|), [0,2,0,0].p / (2 |p|)
    cos_image = [0.0, 3 / (3 * r3)]     # [0,0,0,1].p = 0, [0,0,3,0].p / (3 |p|)
    want = np.mean([1 - c for c in cos_image]) + np.mean([1 - c for c in cos_text])
    assert alignment_loss(feats, p, text_dim=2).item() == pytest.approx(want, abs=1e-6)
    s = scores(feats, torch.stack([p, torch.tensor([0.0, 0.0, 0.0, 1.0])]), text_dim=2)
    assert s[:, 0].tolist() == pytest.approx([0.5 * a + 0.5 * b for a, b in zip(cos_image, cos_text)], abs=1e-6)
    assert s[:, 1].tolist() == pytest.approx([0.5 * 1 + 0.5 * 0, 0.0], abs=1e-6)


def test_scores_and_the_choice_are_hand_computed_cosines():
    g = torch.Generator().manual_seed(0)
    bank = PromptBank(hidden=8, text_dim=5, image_dim=3, prompts=P)
    for t in ("A", "B", "C"):
        bank.add(t, torch.randn(P, 8, generator=g), g)
    feats = torch.randn(6, 8, generator=g)
    with torch.no_grad():
        protos = bank.prototypes()
        got = scores(feats, protos, 5)
    first, second = bank.transforms[1][0], bank.transforms[1][2]
    W1, b1, W2, b2 = (t.detach().numpy().astype(np.float64)
                      for t in (first.weight, first.bias, second.weight, second.bias))
    x = bank.prompts[1].detach().numpy().astype(np.float64)
    h = x @ W1.T + b1
    proto_b = ((h / (1 + np.exp(-h))) @ W2.T + b2).mean(0)  # SiLU, then the mean over the task's rows
    assert np.allclose(protos[1].numpy(), proto_b, atol=1e-5)
    want = np.zeros((6, 3))
    for b, f in enumerate(feats.numpy().astype(np.float64)):
        for t, p in enumerate(protos.numpy().astype(np.float64)):
            q, v = f[:5], f[5:]
            want[b, t] = 0.5 * (v @ p[5:]) / (np.linalg.norm(v) * np.linalg.norm(p)) + \
                0.5 * (q @ p[:5]) / (np.linalg.norm(q) * np.linalg.norm(p))
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def _Job(task, init=None, seed=0, prompts=P, **kw):
    from cl_service.train.job import TrainJob, job_options

    return TrainJob(name=f"modalprompt/{task}", kind="modalprompt", task=task, out_dir="", base_path="", dataset="",
                    parts=(), lora=None, train=None, init_adapter=init, seed=seed,
                    options=job_options(prompts=prompts)).replace(**kw)


def test_the_batch_loss_of_a_job_is_the_formula_on_its_task_prototype(build, samples):
    """Through ``attach``: the batch loss looks up each row's features by its tokens and pixels and compares them
    with the training task's prototype; only that task's rows and transform train."""
    m = build()
    fam = ModalPromptFamily()
    batch = m.collate(samples[:3], train=True)
    keys = row_keys(m, batch)
    assert len(set(keys)) == 3 and keys == row_keys(m, m.collate(samples[:3], train=True))
    F_ = m.hidden_size + m.model.config.vision_config.hidden_size
    feats = torch.randn(3, F_, generator=torch.Generator().manual_seed(1))
    table = FeatureTable()
    table.add(keys, feats)
    attached = fam.attach(_Job("RS"), m, table)
    bank = getattr(m.model, ATTR)
    assert [p.data_ptr() for p in attached.params] == [p.data_ptr() for p in
                                                      [bank.prompts[0], *bank.transforms[0].parameters()]]
    with torch.no_grad():
        p = bank.prototype(0)
        q, v = feats[:, :m.hidden_size], feats[:, m.hidden_size:]
        ct = (q @ p[:m.hidden_size]) / (q.norm(dim=1) * p.norm())
        ci = (v @ p[m.hidden_size:]) / (v.norm(dim=1) * p.norm())
        assert attached.batch_loss(batch).item() == pytest.approx(((1 - ci).mean() + (1 - ct).mean()).item(), abs=1e-5)
    with pytest.raises(KeyError, match="preparation pass did not see"):
        attached.batch_loss(m.collate(samples[3:5], train=True))
    fam.release(m)
    assert m.soft_prompt is None and not hasattr(m.model, ATTR)


def test_a_job_with_settings_the_family_would_ignore_is_refused(build):
    """A LoRA, MoE or O-LoRA setting, or an option other than ``prompts``, would go into the job's key and change
    nothing here: refused before anything is attached."""
    from cl_service.adapters.lora import LoraCfg
    from cl_service.train.job import job_options

    m = build()
    fam = ModalPromptFamily()
    for bad in ({"lora": LoraCfg(rank=4, alpha=8)}, {"moe_experts": 2}, {"orth_lambda": 0.5},
                {"options": job_options(prompts=P, top_k=2)}, {"options": job_options()}):
        with pytest.raises(ValueError, match="modalprompt job"):
            fam.attach(_Job("RS", **bad), m, FeatureTable())
        assert not hasattr(m.model, ATTR) and m.soft_prompt is None


def test_the_preparation_pass_keeps_the_routing_features_by_content(build, samples):
    m = build()
    data = JobData(samples[:5], m.collate, batch_size=2)
    table = ModalPromptFamily().prepare(_Job("RS"), m, data)
    assert len(table) == 5
    batch = m.collate(samples[1:4], train=True)  # other batch boundaries than the pass's
    assert torch.allclose(table.lookup(row_keys(m, batch)), m.routing_features(samples[1:4]), atol=1e-5)


def _bank_folder(tmp_path, mllm, tasks, prototypes) -> Path:
    """A published ModalPrompt adapter whose prototypes are exactly ``prototypes`` (each transform's last Linear
    zero, its bias the prototype), with random prompt rows."""
    from cl_service.adapters.registry import finalize_adapter

    fam = ModalPromptFamily()
    g = torch.Generator().manual_seed(3)
    bank = PromptBank(mllm.model.get_input_embeddings().weight.shape[1], mllm.hidden_size,
                      mllm.model.config.vision_config.hidden_size, prompts=P)
    for t, p in zip(tasks, prototypes):
        i = bank.add(t, 20 * torch.randn(P, bank.hidden, generator=g), g)
        with torch.no_grad():
            bank.transforms[i][2].weight.zero_()
            bank.transforms[i][2].bias.copy_(p)
    setattr(mllm.model, ATTR, bank)
    folder = tmp_path / "mp"
    folder.mkdir()
    fam.save(None, mllm, folder, None)
    fam.release(mllm)
    finalize_adapter(folder, id="modalprompt:stage-1", kind="modalprompt", task=tasks[-1], description="test",
                     base="test", job_key="test")
    return folder


def test_each_request_of_one_batch_gets_its_own_top_tasks_prompts(tmp_path, tiny_base, dcl_shards):
    """Prototypes set to two test requests' own (normalised, block-wise) features: in one batch each request picks
    its own task, and the batched answer of every row equals that request answered alone with its task's rows."""
    from cl_service.adapters.export import export_adapter
    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine

    torch.set_num_threads(1)
    engine = Engine(tiny_base)
    ds = ShardDataset(dcl_shards)
    rs, med = ds.samples("RS", "test")[:2], ds.samples("Med", "test")[:2]
    f = torch.as_tensor(engine.routing_features([rs[0], med[0]]))
    H = engine.mllm.hidden_size
    unit = torch.cat([f[:, :H] / f[:, :H].norm(dim=1, keepdim=True), f[:, H:] / f[:, H:].norm(dim=1, keepdim=True)], 1)
    folder = _bank_folder(tmp_path, engine.mllm, ["RS", "Med"], unit)
    batch = [rs[0], med[0], rs[1], med[1]]
    chosen = engine.choose_prompts(batch, str(folder))
    assert chosen[:2] == ["RS", "Med"]
    want = scores(torch.as_tensor(engine.routing_features(batch)), unit, H).argmax(-1).tolist()
    assert chosen == [["RS", "Med"][i] for i in want]
    together = engine.answer_prompted(batch, str(folder), chosen, 4)
    alone = [engine.answer_prompted([s], str(folder), [t], 4)[0] for s, t in zip(batch, chosen)]
    assert together == alone
    assert engine.answer(batch, str(folder), 4) == together  # Engine.answer picks the same prompts itself
    assert engine.answer_prompted(batch, str(folder), ["Med", "RS", "Med", "RS"], 4) != together
    with pytest.raises(ValueError, match="mixed batches"):
        engine.answer_mixed(batch, [str(folder)] * 4, 4)
    with pytest.raises(ValueError, match="a ModalPrompt adapter .* no peft or merged form"):
        export_adapter(folder, tiny_base, "peft", tmp_path / "out")


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def test_a_job_trains_only_its_tasks_rows_and_transform(tmp_path, tiny_base, dcl_shards):
    from cl_service.train.job import DataPart, TrainJob, job_options
    from cl_service.train.loop import TrainCfg
    from cl_service.train.runner import run_train_job

    torch.set_num_threads(1)
    base_before = _files(tiny_base)

    def job(name, task, init=None):
        return TrainJob(name=f"modalprompt/{name}", kind="modalprompt", task=task, out_dir=str(tmp_path / name),
                        base_path=str(tiny_base), dataset=str(dcl_shards), parts=(DataPart(task, limit=8),), lora=None,
                        train=TrainCfg(lr=1e-2, max_steps=2, batch_size=4), init_adapter=init,
                        options=job_options(prompts=P))

    s0, s1 = job("s0", "RS"), job("s1", "Med", str(tmp_path / "s0"))
    run_train_job(s0)
    run_train_job(s1)
    w0, w1 = load_file(str(tmp_path / "s0" / WEIGHTS)), load_file(str(tmp_path / "s1" / WEIGHTS))
    assert json.loads((tmp_path / "s1" / CONFIG).read_text())["tasks"] == ["RS", "Med"]
    assert set(w0) < set(w1) and {k.split(".")[1] for k in w1} == {"0", "1"}
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the earlier task's rows and transform bitwise unchanged
    from cl_service.models.mllm import load_mllm

    table = load_mllm(tiny_base).model.get_input_embeddings().weight
    for w in (w0, w1):  # each task's rows moved away from the vocabulary rows they started as
        rows = w[f"prompts.{len(w) // 5 - 1}"]
        assert rows.shape == (P, table.shape[1]) and not any(torch.equal(r, e) for r in rows for e in table)
    assert _files(tiny_base) == base_before
