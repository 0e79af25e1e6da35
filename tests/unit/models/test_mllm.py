"""The MLLM wrapper: collation, forward, generation, features, persistence, tokenizer, the model store."""

import dataclasses
import io
import json

import pytest
import torch
from PIL import Image

from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset
from cl_service.data.synth import BENCHMARKS
from cl_service.models.config import PROFILES, ModelCfg
from cl_service.models.mllm import IGNORE, MODEL_CFG_FILE, build_mllm, load_mllm, prompt_text, target_text
from cl_service.models.tokenizer import train_tokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mllm(tiny_base):
    torch.set_num_threads(1)
    return load_mllm(tiny_base)


@pytest.fixture(scope="module")
def samples(dcl_shards):
    ds = ShardDataset(dcl_shards)
    return ds.samples("AD", "train")[:3] + ds.samples("Fin", "test")[:3]


def test_collate_and_finite_loss(mllm, samples):
    batch = mllm.collate(samples, train=True)
    B, L = batch["input_ids"].shape
    assert B == 6 and batch["labels"].shape == (B, L) and batch["pixel_values"].shape[0] == 6
    assert (batch["labels"] != -100).any(dim=1).all()  # every sample has answer tokens to learn
    loss = mllm.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0


def test_loss_on_label_positions_equals_transformers_full_loss(mllm, samples):
    """``loss`` runs the output head only where a label is predicted; the number and its gradients are
    transformers' own shifted causal-LM loss over the full logits."""
    batch = mllm.collate(samples, train=True)
    params = [p for p in mllm.model.parameters() if p.dtype.is_floating_point][:6] + [mllm.model.lm_head.weight]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        ours = mllm.loss(batch)
        g_ours = torch.autograd.grad(ours, params)
        full = mllm.forward(batch).loss
        g_full = torch.autograd.grad(full, params)
    finally:
        for p, rg in zip(params, before):
            p.requires_grad_(rg)
    assert all(g.abs().sum() > 0 for g in g_ours)
    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    none = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no answer tokens"):
        mllm.loss(none)


def test_generate_is_deterministic_and_batched_like_single(mllm, samples):
    a = mllm.generate(samples, max_new_tokens=4, batch_size=6)
    b = mllm.generate(samples, max_new_tokens=4, batch_size=2)
    assert a == b and len(a) == 6 and all(isinstance(x, str) for x in a)


def test_save_load_round_trip_identical_logits(mllm, samples, tmp_path):
    mllm.save(tmp_path / "copy")
    again = load_mllm(tmp_path / "copy")
    batch = mllm.collate(samples, train=False)
    with torch.no_grad():
        assert torch.equal(mllm.forward(batch).logits, again.forward(batch).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # atomic save leaves no temp folder


def test_corrupt_image_is_a_clear_error(mllm, samples):
    bad = Sample("RS", "test", "broken-7", [b"\x89PNG\r\n\x1a\nnot really"], "q?", ["yes"], "rs")
    with pytest.raises(ValueError, match="sample 'broken-7': image 0 does not decode"):
        mllm.collate([samples[0], bad], train=False)


def test_load_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint"):
        load_mllm(tmp_path)


# ---------------------------------------------------------------- details, on a model built here
CFG = ModelCfg(name="unit", image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
               vision_intermediate=64, text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1,
               text_intermediate=128, vocab_size=400, max_length=160)


@pytest.fixture(scope="module")
def dcl():
    return list(BENCHMARKS.get("dcl-mini").generate("train", 4, 0))  # 20 samples; AD images are 96x64


@pytest.fixture(scope="module")
def tok(dcl):
    return train_tokenizer([prompt_text(s.question) + target_text(s.answer) for s in dcl], CFG.vocab_size)


@pytest.fixture(scope="module")
def built(tok):
    torch.set_num_threads(1)
    return build_mllm(CFG, tok, seed=0)


def _png(size, colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_tokenizer_is_byte_level_and_deterministic(dcl, tok):
    again = train_tokenizer([prompt_text(s.question) + target_text(s.answer) for s in dcl], CFG.vocab_size)
    assert again.get_vocab() == tok.get_vocab()
    text = "Ünïcode 漢字 🙂 never seen"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")] == [0, 1, 2, 3]
    assert tok("<image><image>", add_special_tokens=False).input_ids == [3, 3]


def test_train_batch_supervises_only_the_answer(built, dcl, tok):
    batch = built.collate(dcl[:5], train=True)
    B, L = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (5, 3, 32, 32)  # 96x64 AD images are resized too
    for b, s in enumerate(dcl[:5]):
        ids, mask, labels = batch["input_ids"][b], batch["attention_mask"][b], batch["labels"][b]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert ids[0] == tok.bos_token_id and int((ids == built.image_token_id).sum()) == built.tokens_per_image == 16
        assert tok.decode(labels[labels != IGNORE]) == target_text(s.answer)
        assert torch.equal(batch["position_ids"][b, :n], torch.arange(n))


def test_generation_batch_is_left_padded_with_an_image_block_per_image(built, dcl):
    two = dataclasses.replace(dcl[0], id="two", images=[_png((50, 20)), _png((7, 90))])
    batch = built.collate([dcl[1], two], train=False)
    assert "labels" not in batch and batch["pixel_values"].shape == (3, 3, 32, 32)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]
    assert int((batch["input_ids"][1] == built.image_token_id).sum()) == 2 * built.tokens_per_image
    assert batch["position_ids"][0, -1] == mask[0].sum() - 1  # positions count real tokens only
    assert built.generate([dcl[1], two], 4) == [built.generate([dcl[1]], 4)[0], built.generate([two], 4)[0]]


def test_long_question_is_cut_from_the_left(built, dcl):
    long = dataclasses.replace(dcl[0], question="word " * 400 + "final question?")
    ids, n_prompt = built.encode(long, with_target=True)
    assert len(ids) == CFG.max_length and ids.count(built.image_token_id) == built.tokens_per_image
    assert built.tokenizer.decode(ids[:n_prompt]).endswith("final question?\nAnswer:")


def test_full_model_training_lowers_the_loss(tok, dcl):
    m = build_mllm(CFG, tok, seed=1)
    assert not any(p.requires_grad for p in m.model.parameters())  # built frozen
    params = list(m.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = m.collate(dcl[:8], train=True)
    m.model.train()
    losses = []
    for _ in range(8):
        loss = m.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_vision_states_can_be_reused(built, dcl):
    batch = built.collate(dcl[:3], train=False)
    vs = built.vision_states(batch["pixel_values"])
    assert vs.shape == (3, built.tokens_per_image, CFG.vision_hidden)
    with torch.no_grad():
        assert torch.equal(built.forward(batch).logits, built.forward(batch, vision_states=vs).logits)
    assert built.generate(dcl[:3], 4, vision_states=vs) == built.generate(dcl[:3], 4)


def test_pooled_features(built, dcl):
    f = built.pooled_features(dcl[:5], batch_size=2)
    assert f.shape == (5, CFG.text_hidden) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.allclose(f[:2], built.pooled_features(dcl[:2]), atol=1e-5)


def test_saved_config_round_trips(built, tmp_path):
    built.save(tmp_path / "m")
    built.save(tmp_path / "m")  # overwriting a save is fine
    assert json.loads((tmp_path / "m" / MODEL_CFG_FILE).read_text())["text_hidden"] == 64
    assert dataclasses.replace(load_mllm(tmp_path / "m").cfg, path=None) == CFG
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tiny_profile_and_strict_cfg():
    tiny = PROFILES.get("tiny")
    assert tiny.tokens_per_image == 64 and tiny.vision_feature_layer == -2 and tiny.path is None
    with pytest.raises(ValueError, match="unknown ModelCfg fields"):
        ModelCfg.from_dict({"nope": 1})


def test_build_base_is_idempotent(tmp_path, monkeypatch):
    from cl_service.models import pretrain, store

    if "unit" not in PROFILES:
        PROFILES.register("unit", CFG)
        pretrain.PRETRAIN.register("unit", pretrain.PretrainCfg(steps=2, batch_size=4, samples=8, tokenizer_samples=2))
    monkeypatch.setenv("CLSVC_MODEL_STORE", str(tmp_path))
    logs = []
    path = store.build_base("unit", progress=False, log=logs.append, device="cpu")
    assert path == tmp_path / "unit" and store.is_valid_base(path)
    meta = json.loads((path / store.BASE_META).read_text())
    assert meta["pretrain"]["steps"] == 2 and meta["model"]["text_hidden"] == 64
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert store.ensure_base("unit", log=logs.append, progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp and "reusing" in logs[-1]
    store.build_base("unit", steps=3, progress=False, log=logs.append, device="cpu")  # another recipe: rebuilt
    assert json.loads((path / store.BASE_META).read_text())["pretrain"]["steps"] == 3
    assert not any(p.requires_grad for p in load_mllm(path).model.parameters())


def test_a_base_built_from_another_corpus_is_rebuilt_and_says_why(tmp_path, monkeypatch):
    from cl_service.models import pretrain, store

    if "unit" not in PROFILES:
        PROFILES.register("unit", CFG)
        pretrain.PRETRAIN.register("unit", pretrain.PretrainCfg(steps=2, batch_size=4, samples=8, tokenizer_samples=2))
    monkeypatch.setenv("CLSVC_MODEL_STORE", str(tmp_path))
    logs: list[str] = []
    path = store.build_base("unit", progress=False, log=logs.append, device="cpu")
    fp = pretrain.corpus_fingerprint()
    assert json.loads((path / store.BASE_META).read_text())["corpus"] == fp
    assert pretrain.corpus_fingerprint() == fp and len(fp) == 16  # deterministic
    # the generators change (here: the fingerprint they would give): the stored base is stale
    monkeypatch.setattr(store, "corpus_fingerprint", lambda seed=0, names=(): "0123456789abcdef")
    store.build_base("unit", progress=False, log=logs.append, device="cpu")
    assert any("another corpus" in line and fp in line and "0123456789abcdef" in line for line in logs), logs
    assert json.loads((path / store.BASE_META).read_text())["corpus"] == "0123456789abcdef"


def test_the_tokenizer_corpus_is_a_fixed_list_of_benchmarks(monkeypatch):
    """A stream added or reworded outside ``tokenizer_benchmarks`` changes neither the tokenizer's texts nor the
    corpus fingerprint, so the base stays the one its results were measured on."""
    import dataclasses

    from cl_service.data.synth import BENCHMARKS
    from cl_service.models import pretrain

    cfg = pretrain.PRETRAIN.get("tiny")
    assert "acl-mini" not in cfg.tokenizer_benchmarks and set(cfg.tokenizer_benchmarks) <= set(BENCHMARKS.names())
    texts, fp = list(pretrain.corpus_texts(2, 0)), pretrain.corpus_fingerprint()
    extra = dataclasses.replace(BENCHMARKS.get("acl-mini"), name="unit-extra")
    monkeypatch.setitem(BENCHMARKS._items, "unit-extra", extra)
    assert "unit-extra" in BENCHMARKS.names()
    assert list(pretrain.corpus_texts(2, 0)) == texts and pretrain.corpus_fingerprint() == fp
    assert pretrain.corpus_fingerprint(names=(*cfg.tokenizer_benchmarks, "unit-extra")) != fp
