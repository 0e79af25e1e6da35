"""``clsvc base assemble``: an LLM folder + a CLIP folder + LLaVA's projector file → a llava-hf base that
computes exactly what the parts compute, speaks the vicuna_v1 conversation and answers through the engine."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from cl_service.cli import main
from cl_service.data.schema import Sample
from cl_service.models.mllm import load_mllm
from cl_service.models.prompting import PROMPT_HINT_FILE, resolve_style, vicuna_prompt
from cl_service.models.tiny_hf import clip_image_processor, write_tiny_components

pytestmark = pytest.mark.timeout(600)


def _png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_tiny_components(tmp_path_factory.mktemp("parts"), seed=0)


@pytest.fixture(scope="module")
def base(parts, tmp_path_factory):
    llm, vision, proj = parts
    out = tmp_path_factory.mktemp("assembled") / "vicuna-clip-llava"
    assert main(["base", "assemble", "--llm", str(llm), "--vision", str(vision), "--projector", str(proj),
                 "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_assembled_folder_is_llava_hf_with_vicuna_template(base, parts):
    from transformers import AutoProcessor, AutoTokenizer, LlavaConfig, LlavaProcessor

    assert not (base / "clsvc_model.json").exists()
    assert json.loads((base / PROMPT_HINT_FILE).read_text())["prompt_style"] == "mllm-cl"
    assert resolve_style(base) == "mllm-cl"
    cfg = LlavaConfig.from_pretrained(base)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (-2, "default", 16)
    proc = AutoProcessor.from_pretrained(base)
    assert isinstance(proc, LlavaProcessor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == vicuna_prompt("Q?")
    msgs += [{"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert proc.apply_chat_template(msgs) == vicuna_prompt("Q?", answer="yes")
    old = AutoTokenizer.from_pretrained(parts[0])
    tok = proc.tokenizer
    assert len(tok) == len(old) + 2 and tok.pad_token == "<pad>"
    assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>") and cfg.text_config.vocab_size == len(tok)
    # the processor expands one <image> to the 16 tokens the model expects
    ids = proc(images=Image.new("RGB", (40, 20)), text=vicuna_prompt("Q?"))["input_ids"][0]
    assert list(ids).count(cfg.image_token_index) == 16


def test_assembled_model_computes_what_the_parts_compute(base, parts):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    llm_dir, vision_dir, proj_file = parts
    m = load_mllm(base)
    assert m.prompt.name == "mllm-cl"
    proj = torch.load(proj_file, weights_only=True)
    mp = m.model.model.multi_modal_projector
    assert torch.equal(mp.linear_1.weight, proj["model.mm_projector.0.weight"])
    assert torch.equal(mp.linear_1.bias, proj["model.mm_projector.0.bias"])
    assert torch.equal(mp.linear_2.weight, proj["model.mm_projector.2.weight"])
    assert torch.equal(mp.linear_2.bias, proj["model.mm_projector.2.bias"])

    lm = LlamaForCausalLM.from_pretrained(llm_dir).eval()
    tower = CLIPVisionModel.from_pretrained(vision_dir).eval()
    n_old = lm.config.vocab_size
    s = Sample("T", "test", "x", [_png(40, 20)], "What colour is it?", ["red"], "exact")
    batch = m.collate([s], train=False)
    with torch.no_grad():
        got = m.forward(batch).logits[..., :n_old]
        h = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        f = torch.nn.functional.gelu(h @ proj["model.mm_projector.0.weight"].T + proj["model.mm_projector.0.bias"])
        f = f @ proj["model.mm_projector.2.weight"].T + proj["model.mm_projector.2.bias"]
        ids = batch["input_ids"]
        emb = lm.get_input_embeddings()(ids.clamp(max=n_old - 1))
        emb[ids == m.image_token_id] = f.reshape(-1, f.shape[-1])
        want = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"]).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_assembled_base_answers_through_the_engine(base):
    from cl_service.engine import Engine

    engine = Engine(base, None)
    samples = [Sample("T", "test", f"s{i}", [_png(40 + 8 * i, 24)], q, ["a"], "exact")
               for i, q in enumerate(["What?", "Is it red? Answer yes or no."])]
    got = engine.answer(samples, None, max_new_tokens=4)
    assert len(got) == 2 and all(isinstance(a, str) for a in got)
    assert got == [engine.answer([s], None, max_new_tokens=4)[0] for s in samples]


def test_clip_model_folder_is_accepted(parts, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    llm, vision, proj = parts
    vcfg = CLIPVisionConfig.from_pretrained(vision)
    full = CLIPModel(CLIPConfig(vision_config=vcfg.to_dict(), text_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
        projection_dim=8))
    full.save_pretrained(tmp_path / "clip")
    clip_image_processor(vcfg.image_size).save_pretrained(tmp_path / "clip")
    from cl_service.models.assemble import assemble_base

    out = assemble_base(llm, tmp_path / "clip", proj, tmp_path / "base", dtype="float32")
    m = load_mllm(out)
    src = full.vision_model.state_dict()
    dst = m.model.model.vision_tower.state_dict()  # transformers 5: CLIPVisionModel is flat
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)


def test_clear_errors(parts, tmp_path, capsys):
    from cl_service.models.assemble import assemble_base

    llm, vision, proj = parts
    args = ["base", "assemble", "--llm", str(llm), "--vision", str(vision), "--out", str(tmp_path / "o")]
    assert main(args + ["--projector", str(tmp_path / "missing.bin")]) == 2
    assert "projector file not found" in capsys.readouterr().err
    bad = {k: v for k, v in torch.load(proj, weights_only=True).items()}
    bad["model.mm_projector.0.weight"] = bad["model.mm_projector.0.weight"][:, :-1]
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"mm_projector\.0\.weight has shape"):
        assemble_base(llm, vision, tmp_path / "bad.bin", tmp_path / "o", dtype="float32")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError):
        assemble_base(llm, vision, proj, tmp_path / "o")
