"""Prompt styles on a tiny llava-hf checkpoint: the product path answers exactly as transformers' own
``LlavaForConditionalGeneration.generate`` with the checkpoint's processor and chat template."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cl_service.data.schema import Sample
from cl_service.models.mllm import load_mllm
from cl_service.models.prompting import VICUNA_SYSTEM, first_answer_tokens, resolve_style
from cl_service.models.tiny_hf import write_tiny_llava_hf

pytestmark = pytest.mark.timeout(600)
N_NEW = 8
QUESTIONS = ["What color is the circle?", "Is there a square? Answer yes or no.",
             "How many shapes are there in this picture, counting the small ones at the left edge too?",
             "Which one?"]


def _png(w: int, h: int, seed: int) -> bytes:
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> list[Sample]:
    sizes = [(40, 24), (32, 32), (20, 50), (64, 48)]
    return [Sample("T", "test", f"s{i}", [_png(w, h, i)], q, ["yes"], "exact")
            for i, ((w, h), q) in enumerate(zip(sizes, QUESTIONS))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_llava_hf(tmp_path_factory.mktemp("hf") / "tiny-llava-hf", seed=0)


def _reference(folder, samples: list[Sample], n: int) -> list[str]:
    """What a transformers user gets from the checkpoint: processor + chat template + generate."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    out = []
    for s in samples:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        with Image.open(io.BytesIO(s.images[0])) as im:
            inputs = proc(images=im.convert("RGB"), text=text, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=n, do_sample=False)
        out.append(proc.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def test_folder_is_a_plain_llava_hf_checkpoint(folder):
    from transformers import AutoProcessor, LlavaProcessor

    assert not (folder / "clsvc_model.json").exists()
    assert resolve_style(folder) == "llava-hf"
    proc = AutoProcessor.from_pretrained(folder)
    assert isinstance(proc, LlavaProcessor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == "USER: <image>\nQ? ASSISTANT:"
    tok = proc.tokenizer
    assert tok.convert_ids_to_tokens(tok("Q?").input_ids)[0] == "<s>"
    assert {"<s>", "</s>", "<unk>", "<pad>", "<image>"} <= set(tok.get_vocab())


def test_engine_answers_equal_transformers_generate(folder):
    from cl_service.engine import Engine

    samples = _samples()
    engine = Engine(folder, None)
    assert engine.mllm.prompt.name == "llava-hf"
    got = engine.answer(samples, None, max_new_tokens=N_NEW)
    want = _reference(folder, samples, N_NEW)
    assert got == want
    assert all(len(a) > 0 for a in got)  # random weights, but real text came out


def test_left_padded_batch_equals_one_at_a_time(folder):
    m = load_mllm(folder)
    samples = _samples()
    batch = m.collate(samples, train=False)
    assert len({int(r.sum()) for r in batch["attention_mask"]}) > 1  # lengths differ: real left padding
    assert m.generate(samples, N_NEW, batch_size=4) == [m.generate([s], N_NEW)[0] for s in samples]


def test_prompt_ids_equal_the_processors(folder):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    m = load_mllm(folder)
    s = _samples()[0]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                   "text": s.question}]}], add_generation_prompt=True)
    with Image.open(io.BytesIO(s.images[0])) as im:
        ref = proc(images=im.convert("RGB"), text=text, return_tensors="pt")
    ids, n = m.encode(s, with_target=False)
    assert ids == ref["input_ids"][0].tolist() and n == len(ids)
    assert torch.equal(m.preprocess_images(s.images, s.id), ref["pixel_values"])
    # training: " yes</s>" after "ASSISTANT:", labels on exactly those tokens
    full, n_prompt = m.encode(s, with_target=True)
    assert full[:n_prompt] == ids and full[-1] == m.eos_id
    assert m.tokenizer.convert_ids_to_tokens(full[n_prompt:]) == ["▁yes", "</s>"]
    batch = m.collate([s], train=True)
    labels = batch["labels"][0]
    assert labels[labels != -100].tolist() == full[n_prompt:]


def test_letter_ids_for_sentencepiece_tokenizer(folder):
    from cl_service.engine import Engine

    engine = Engine(folder, None)
    tok = engine.mllm.tokenizer
    for L in "ABCDE":  # in the vocabulary as "▁A" ...: what the model emits after "ASSISTANT:"
        assert tok.convert_ids_to_tokens(engine._letter_ids[L]) == "▁" + L
    for L in "XYZ":  # no "▁X" piece: "▁" then the letter's byte; token 0 of " X" (the old rule) is the bare "▁"
        assert tok.convert_ids_to_tokens(tok(" " + L, add_special_tokens=False).input_ids)[0] == "▁"
        assert tok.decode([engine._letter_ids[L]]) == L


def test_letter_ids_unchanged_for_byte_level_tiny_base(tiny_base):
    m = load_mllm(tiny_base)
    assert m.prompt.name == "clsvc"
    tok = m.tokenizer
    old = {L: tok(" " + L, add_special_tokens=False).input_ids[0] for L in "ABCDE"}
    assert first_answer_tokens(m, "ABCDE") == old


def test_mllm_cl_prompt_is_vicuna_v1(folder):
    m = load_mllm(folder, prompt_style="mllm-cl")
    assert m.prompt.name == "mllm-cl"
    q = "What is shown? Answer with one word."
    want = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the human's questions. USER: <image>\n" + q + " ASSISTANT:")
    assert VICUNA_SYSTEM + " USER: <image>\n" + q + " ASSISTANT:" == want
    assert m.prompt.prompt_string(m, q, 1) == want
    s = Sample("T", "test", "x", [_png(40, 24, 0)], q, ["cat"], "exact")
    ids, n = m.encode(s, with_target=True)
    k = m.tokens_per_image
    assert ids[0] == m.bos_id and ids.count(m.image_token_id) == k and ids.count(m.bos_id) == 1
    first = ids.index(m.image_token_id)
    tok = m.tokenizer
    assert tok.decode(ids[1:first]) == want.split("<image>")[0]  # "... USER:" then "▁"
    assert tok.decode(ids[first + k:n]).endswith(q + " ASSISTANT:")
    assert tok.decode(ids[n:]) == "cat</s>" and ids[-1] == m.eos_id


def test_pixels_pad_to_square_vs_centre_crop(folder):
    red = Image.new("RGB", (64, 32), (250, 10, 10))  # wide: pads above and below
    buf = io.BytesIO()
    red.save(buf, format="PNG")
    pad = load_mllm(folder, prompt_style="mllm-cl")
    crop = load_mllm(folder)
    ip = pad.prompt.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1), torch.tensor(ip.image_std).view(3, 1)
    fill = torch.tensor([int(x * 255) for x in ip.image_mean], dtype=torch.float32).view(3, 1) / 255
    red_v = (torch.tensor([250, 10, 10], dtype=torch.float32).view(3, 1) / 255 - mean) / std
    fill_v = (fill - mean) / std
    x = pad.preprocess_images([buf.getvalue()])[0]  # [3, 32, 32]: rows 0-7 and 24-31 are padding
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, :6].reshape(3, -1), fill_v.expand(3, 6 * 32), atol=2e-2)
    assert torch.allclose(x[:, 26:].reshape(3, -1), fill_v.expand(3, 6 * 32), atol=2e-2)
    assert torch.allclose(x[:, 10:22].reshape(3, -1), red_v.expand(3, 12 * 32), atol=2e-2)
    y = crop.preprocess_images([buf.getvalue()])[0]  # shortest edge 32, centre crop: all red
    assert torch.allclose(y.reshape(3, -1), red_v.expand(3, 32 * 32), atol=2e-2)


def test_run_stream_zero_shot_predictions_equal_transformers(folder, dcl_shards, tmp_path):
    from cl_service.config import load_run_cfg
    from cl_service.data.shards import ShardDataset
    from cl_service.run import LocalTrainer, run_stream

    cfg = load_run_cfg(None, [f"out={tmp_path / 'run'}", f"data.path={dcl_shards}", f"base.path={folder}",
                              "data.tasks=[RS,Med]", "methods=[zero_shot]", "eval.max_new_tokens=5",
                              "data.test_limit=3", "ray.num_workers=0"])
    run_stream(cfg, LocalTrainer())
    lines = [json.loads(x) for f in sorted((tmp_path / "run" / "predictions").rglob("*.jsonl"))
             for x in f.read_text().splitlines()]
    assert lines
    ds = ShardDataset(dcl_shards)
    by_id = {s.id: s for s in ds.iter_samples() if s.split == "test"}
    samples = [by_id[x["question_id"]] for x in lines]
    assert [x["text"] for x in lines] == _reference(folder, samples, 5)


def test_styles_can_be_forced_on_a_clsvc_base(tiny_base):
    s = Sample("T", "test", "x", [_png(40, 24, 0)], "What?", ["yes"], "exact")
    m = load_mllm(tiny_base, prompt_style="mllm-cl")  # no processor: pad, then our resize + normalisation
    ids, n = m.encode(s, with_target=True)
    assert ids[0] == m.bos_id and ids.count(m.image_token_id) == m.tokens_per_image
    assert m.tokenizer.decode(ids[1:ids.index(m.image_token_id)]) == VICUNA_SYSTEM + " USER: "
    assert len(m.generate([s], 3)) == 1
    with pytest.raises(ValueError, match="needs the checkpoint's processor"):
        load_mllm(tiny_base, prompt_style="llava-hf")
