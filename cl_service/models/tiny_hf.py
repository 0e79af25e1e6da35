"""Tiny random checkpoints in the *real* layouts, built offline: a llava-hf folder and its components.

They stand in for ``llava-hf/llava-1.5-7b-hf`` (and for vicuna / CLIP folders) in tests: the same classes,
files and conventions (a SentencePiece-style Llama tokenizer with byte fallback and a prefix space, the
llava-1.5 chat template, a ``CLIPImageProcessor`` with shortest-edge resize + centre crop, a
``LlavaProcessor``), at a size that runs on a CPU in a second. No cl-service metadata is written, so
:func:`cl_service.models.mllm.load_mllm` treats them as foreign checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from cl_service._atomic import replace_dir

#: The chat template of ``llava-hf/llava-1.5-7b-hf`` (its ``chat_template.json``): ``USER: <image>\n... ASSISTANT:``.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "USER: What color is the circle in the image? ASSISTANT: red",
    "USER: Is there a square? Answer yes or no. ASSISTANT: yes",
    "USER: How many shapes are there? Answer with a number. ASSISTANT: 3",
    "Which expert should answer? The letter of the most suitable expert is: A B C D E",
    "ASSISTANT: A ASSISTANT: B ASSISTANT: C ASSISTANT: D ASSISTANT: E",
    "the answer is blue green yellow left right top bottom no one two four",
)


def sp_tokenizer(texts: Iterable[str] = _CORPUS, vocab_size: int = 512, pad: bool = True,
                 image: bool = True) -> LlamaTokenizer:
    """A SentencePiece-style ``LlamaTokenizer`` (BPE over ``▁``-marked words, byte fallback, a prefix space,
    ``<s>`` added in front) trained on ``texts``: ids 0-2 ``<unk> <s> </s>``, 3-258 the byte tokens, then
    the merges; ``<pad>`` and ``<image>`` appended as added tokens when asked (as in llava-hf)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, min_frequency=1, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator(list(texts), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False)
    if image:
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if pad:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def clip_image_processor(image_size: int):
    """CLIP's image processor (shortest-edge resize to ``image_size``, centre crop, CLIP normalisation);
    the PIL backend where torchvision is missing."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
               do_resize=True, do_center_crop=True)


def tiny_vision_config(image_size: int = 32, patch_size: int = 8) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu")


def tiny_text_config(tok: LlamaTokenizer) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def _stage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def write_tiny_llava_hf(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Write a tiny random llava-hf checkpoint to ``path`` (atomically) and return ``path``.

    ``LlavaForConditionalGeneration`` (2-layer CLIP, 2-layer Llama, float32, deterministic in ``seed``),
    :func:`sp_tokenizer`, the llava-1.5 chat template and a ``LlavaProcessor`` whose
    ``CLIPImageProcessor`` resizes the shortest edge to ``image_size`` and centre-crops; image tokens
    per image = ``(image_size/patch_size)²``."""
    path = Path(path)
    tok = sp_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=tiny_vision_config(image_size, patch_size), text_config=tiny_text_config(tok),
                      image_token_index=image_id, image_seq_length=(image_size // patch_size) ** 2,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).float().eval()
    processor = LlavaProcessor(image_processor=clip_image_processor(image_size), tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_15_CHAT_TEMPLATE)
    tmp = _stage(path)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    replace_dir(tmp, path)
    return path


def write_tiny_components(root: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8
                          ) -> tuple[Path, Path, Path]:
    """The three inputs of :func:`cl_service.models.assemble.assemble_base` in their real layouts, tiny:
    ``llm/`` (a ``LlamaForCausalLM`` + SentencePiece-style tokenizer without ``<image>``/``<pad>``, like
    vicuna), ``vision/`` (a ``CLIPVisionModel`` + ``preprocessor_config.json``) and ``mm_projector.bin``
    (LLaVA-1.5 stage-1 keys). Returns ``(llm_dir, vision_dir, projector_file)``."""
    root = Path(root)
    tok = sp_tokenizer(pad=False, image=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(tiny_text_config(tok)).float()
        vcfg = tiny_vision_config(image_size, patch_size)
        vision = CLIPVisionModel(vcfg).float()
        th = llm.config.hidden_size
        proj = {"model.mm_projector.0.weight": torch.randn(th, vcfg.hidden_size) * 0.1,
                "model.mm_projector.0.bias": torch.randn(th) * 0.1,
                "model.mm_projector.2.weight": torch.randn(th, th) * 0.1,
                "model.mm_projector.2.bias": torch.randn(th) * 0.1}
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    vision.save_pretrained(root / "vision")
    clip_image_processor(image_size).save_pretrained(root / "vision")
    torch.save(proj, root / "mm_projector.bin")
    return root / "llm", root / "vision", root / "mm_projector.bin"
