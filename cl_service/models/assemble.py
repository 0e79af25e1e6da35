"""Assemble a llava-hf base from its parts, as the reference code trains from them (``clsvc base assemble``).

MLLM-CL's experts and routers start from **vicuna-7b-v1.5 + the LLaVA-1.5 stage-1 projector**
(``mm_projector.bin`` of ``llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``) with the CLIP tower
``clip-vit-large-patch14-336``: no ready checkpoint holds that combination. :func:`assemble_base` writes
one in the Hugging Face LLaVA layout, loadable by ``LlavaForConditionalGeneration``/``AutoProcessor`` and by
:func:`cl_service.models.mllm.load_mllm`:

- the LLM's decoder and head, the CLIP vision tower (a ``CLIPModel`` or ``CLIPVisionModel`` folder) and the
  projector (``model.mm_projector.0/2`` → ``multi_modal_projector.linear_1/linear_2``, GELU between) as they are;
- ``<image>`` (and ``<pad>`` when the tokenizer has no pad token) added to the tokenizer; their embedding and
  output rows are the mean of the existing rows (never attended / never the argmax);
- ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``, ``image_seq_length`` =
  ``(image_size/patch_size)²`` (576 at 336 px);
- a ``LlavaProcessor`` (the CLIP folder's image processor, the tokenizer, a chat template for the
  ``vicuna_v1`` conversation) and ``clsvc_prompt.json`` = ``{"prompt_style": "mllm-cl", ...}``, so
  ``base.prompt_style: auto`` speaks the reference's conversation and pads images to a square.

The folder is written to a staging folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from cl_service._atomic import replace_dir
from cl_service.models.prompting import PROMPT_HINT_FILE, VICUNA_SYSTEM

#: ``vicuna_v1`` as a chat template: ``system + " "``, then ``"USER: " + "<image>\n"×n + text + " "`` per user
#: turn and ``"ASSISTANT: " + text + "</s>"`` per assistant turn; the generation prompt is ``"ASSISTANT:"``.
#: A system message replaces the default system line.
VICUNA_V1_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] if messages[0]"
    "['content'] is string else (messages[0]['content'] | map(attribute='text') | join('')) %}{% set msgs = "
    "messages[1:] %}{% else %}{% set sys = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}{% set msgs = messages"
    " %}{% endif %}{{ sys + ' ' }}{% for message in msgs %}{% if message['content'] is string %}{% set text = "
    "message['content'] %}{% set n_img = 0 %}{% else %}{% set text = message['content'] | selectattr('type', "
    "'equalto', 'text') | map(attribute='text') | join('') %}{% set n_img = message['content'] | selectattr("
    "'type', 'equalto', 'image') | list | length %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + '<image>\n' * n_img + text + ' ' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + text + '</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROJ = {"linear_1": "mm_projector.0", "linear_2": "mm_projector.2"}


def _need(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def _projector_state(file: Path, vision_hidden: int, text_hidden: int) -> dict[str, torch.Tensor]:
    """``mm_projector.bin`` → the state dict of ``LlavaMultiModalProjector`` (shapes checked)."""
    raw = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a dict of tensors (LLaVA's mm_projector.bin), got {type(raw).__name__}")
    want = {"linear_1.weight": (text_hidden, vision_hidden), "linear_1.bias": (text_hidden,),
            "linear_2.weight": (text_hidden, text_hidden), "linear_2.bias": (text_hidden,)}
    out = {}
    for name, shape in want.items():
        layer, param = name.split(".")
        src = f"{_PROJ[layer]}.{param}"
        keys = [k for k in raw if k == src or k.endswith("." + src)]
        if len(keys) != 1:
            raise ValueError(f"{file}: expected one key ending in {src!r} (e.g. 'model.{src}'); keys: {sorted(raw)}")
        t = raw[keys[0]]
        if tuple(t.shape) != shape:
            raise ValueError(f"{file}: {keys[0]} has shape {tuple(t.shape)} but this LLM and vision tower need "
                             f"{shape} (vision hidden {vision_hidden} -> text hidden {text_hidden})")
        out[name] = t
    if len(raw) != 4:
        raise ValueError(f"{file}: expected the 4 tensors of a 2-layer MLP projector, found {sorted(raw)}")
    return out


def _complete(info: dict, folder: Path) -> None:
    """A part whose weights did not all load would be silently random: refuse it."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{folder}: weights missing for {len(missing)} parameters (e.g. {missing[:3]}); "
                         "is this the right kind of folder?")


def _mean_rows(weight: torch.Tensor, n_old: int) -> None:
    with torch.no_grad():
        weight[n_old:] = weight[:n_old].float().mean(0, keepdim=True).to(weight.dtype)


def assemble_base(llm: str | Path, vision: str | Path, projector: str | Path, out: str | Path,
                  dtype: str = "bfloat16", force: bool = False) -> Path:
    """Write a llava-hf folder at ``out`` from an LLM folder (``LlamaForCausalLM`` + tokenizer), a CLIP folder
    (``CLIPModel``/``CLIPVisionModel`` + ``preprocessor_config.json``) and LLaVA's ``mm_projector.bin``;
    parameters in ``dtype``. Returns ``out``. ``FileExistsError`` when ``out`` exists (unless ``force``),
    ``FileNotFoundError`` for a missing input, ``ValueError`` for a projector that does not fit."""
    from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, AddedToken,
                              CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    llm, vision, projector, out = Path(llm), Path(vision), Path(projector), Path(out)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    for p, what in ((llm / "config.json", "LLM config"), (vision / "config.json", "vision tower config"),
                    (vision / "preprocessor_config.json", "CLIP image processor config"),
                    (projector, "projector file")):
        _need(p, what)
    if not any((llm / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer in {llm} (tokenizer.json or tokenizer.model)")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    torch_dtype = _DTYPES[dtype]

    tok = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    if "<image>" not in tok.get_vocab():
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    lm, info = AutoModelForCausalLM.from_pretrained(llm, dtype=torch_dtype, local_files_only=True,
                                                    output_loading_info=True)
    _complete(info, llm)
    n_old = lm.get_input_embeddings().weight.shape[0]
    if len(tok) > n_old:
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
        _mean_rows(lm.get_input_embeddings().weight, n_old)
        _mean_rows(lm.get_output_embeddings().weight, n_old)
    vcfg = AutoConfig.from_pretrained(vision, local_files_only=True)
    vcfg = getattr(vcfg, "vision_config", vcfg)  # a CLIPModel folder holds the tower's config inside
    tower, info = CLIPVisionModel.from_pretrained(vision, config=vcfg, dtype=torch_dtype, local_files_only=True,
                                                  output_loading_info=True)
    _complete(info, vision)

    tcfg = lm.config
    tcfg.pad_token_id = tok.pad_token_id
    cfg = LlavaConfig(vision_config=tower.config.to_dict(), text_config=tcfg.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=(vcfg.image_size // vcfg.patch_size) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=bool(tcfg.tie_word_embeddings))
    proj = LlavaMultiModalProjector(cfg)
    proj.load_state_dict(_projector_state(projector, vcfg.hidden_size, tcfg.hidden_size))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    # the parts as loaded (their non-persistent buffers included), not a copy through a state dict
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.model.multi_modal_projector = proj.to(torch_dtype)
    model.lm_head = lm.lm_head
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"assembly left parameters unset: {meta[:5]}")
    model.eval()

    image_processor = AutoImageProcessor.from_pretrained(vision, local_files_only=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VICUNA_V1_CHAT_TEMPLATE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / PROMPT_HINT_FILE).write_text(json.dumps({
            "prompt_style": "mllm-cl", "assembled_from": {"llm": str(llm), "vision": str(vision),
                                                          "projector": str(projector)}, "dtype": dtype},
            indent=2, sort_keys=True))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
