"""The MLLM: a transformers ``LlavaForConditionalGeneration`` + its tokenizer + its prompt style.

How a sample becomes token ids and pixels is the base's prompt style (:mod:`cl_service.models.prompting`:
``clsvc`` for our tiny bases, ``llava-hf`` for a checkpoint's own chat template and processor, ``mllm-cl`` for
the reference code's vicuna_v1 conversation); :meth:`MLLM.encode` and :meth:`MLLM.preprocess_images` are the
only entry points, so training, generation, routing features and serving all speak it. In every style each
image gets its own block of ``k`` ``<image>`` tokens (``k`` = ``(image_size/patch_size)²``, CLS dropped),
blocks in the sample's image order (``pixel_values`` rows follow the same order, sample after sample); tiled
views such as the 2×3 driving cameras arrive as one already-tiled image and stay one block.

Forward passes always go through :meth:`MLLM.embed`: CLIP hidden state ``vision_feature_layer`` (CLS
dropped) → projector → scattered into the token embeddings at the ``<image>`` positions → Llama.
The CLIP states (:meth:`MLLM.vision_states`) can be computed once and passed again
(``vision_states=``) to later passes on the same images, e.g. route then answer: valid as long as the
adapters in between leave the vision tower alone (``LoraCfg.vision=False``); the projector, which every
expert trains, is applied per pass. Position ids are always derived from the attention mask, so right
padding (training) and left padding (generation) give the same positions to the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from cl_service._atomic import replace_dir
from cl_service.data.schema import Sample
from cl_service.models.config import ModelCfg
from cl_service.models.generate import StepDecoder, generate as _greedy
from cl_service.models.prompting import (ANSWER_CUE, ClsvcFormat, PromptFormat, load_format, prompt_text,
                                        resolve_style, target_text)
from cl_service.models.tokenizer import IMAGE_TOKEN

__all__ = ["ANSWER_CUE", "IGNORE", "MLLM", "MODEL_CFG_FILE", "build_mllm", "llava_config", "load_mllm",
           "prompt_text", "target_text"]

#: Projected image features ``[N_img, k, H]``, or a function ``pixel_values -> features``.
ImageFeatures = "torch.Tensor | Callable[[torch.Tensor], torch.Tensor]"

MODEL_CFG_FILE = "clsvc_model.json"
#: CLIP's normalisation (LLaVA-1.5 inherits it); also used for the tiny models so real bases plug in.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE = -100


def llava_config(cfg: ModelCfg, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """A transformers ``LlavaConfig`` for ``cfg`` (vocab = the tokenizer's full size)."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=max(512, cfg.max_length), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=cfg.tokens_per_image, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class MLLM:
    """A LLaVA model with its tokenizer and preprocessing. ``peft`` is set once LoRA is attached
    (:func:`cl_service.adapters.lora.attach_lora`); the LoRA layers live inside ``model`` either way.
    ``prompt`` is the prompt style (:mod:`cl_service.models.prompting`; default ``clsvc``)."""

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, cfg: ModelCfg,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 prompt: PromptFormat | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prompt: PromptFormat = prompt if prompt is not None else ClsvcFormat()
        self.peft = None  # peft.PeftModel, set by attach_lora/load_adapter
        self._disabled_lock = threading.Lock()
        self._disabled_depth = 0
        self._disabled_cm = None
        #: generation keeps the KV cache in buffers sized for the whole answer (no copy of the cache per token)
        self.preallocate_kv = True
        c = model.config
        self.image_token_id = int(c.image_token_index)
        self.image_size = int(c.vision_config.image_size)
        full = c.vision_feature_select_strategy == "full"
        self.tokens_per_image = (self.image_size // int(c.vision_config.patch_size)) ** 2 + int(full)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def to(self, device: str | torch.device) -> "MLLM":
        self.model.to(device)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the plain base inside this block (no-op when no adapter is attached).

        Blocks may overlap across threads (two pipeline stages): peft's adapters are switched off when the
        first block opens and back on when the last one closes."""
        if self.peft is None:
            yield
            return
        with self._disabled_lock:
            if self._disabled_depth == 0:
                self._disabled_cm = self.peft.disable_adapter()
                self._disabled_cm.__enter__()
            self._disabled_depth += 1
        try:
            yield
        finally:
            with self._disabled_lock:
                self._disabled_depth -= 1
                if self._disabled_depth == 0:
                    cm, self._disabled_cm = self._disabled_cm, None
                    cm.__exit__(None, None, None)

    def fuse_kernels(self) -> dict[str, int]:
        """Run the decoder's RMSNorms, rotary embedding and SwiGLU through fused GPU kernels
        (:mod:`cl_service.models.kernels`: one pass each instead of transformers' several, same rounding).
        A GPU inference speed option; on the CPU or under autograd the patched modules run the plain math.
        Returns how many modules were patched now."""
        from cl_service.models.kernels import fuse_llama

        return fuse_llama(self.model)

    # ------------------------------------------------------------------ preprocessing
    def preprocess_images(self, images: Sequence[bytes], sample_id: str = "?") -> torch.Tensor:
        """Encoded images → ``[n, 3, S, S]`` float32 as the prompt style prepares them (``clsvc``: resized to
        ``S = image_size`` and CLIP-normalised). Raises ``ValueError`` naming ``sample_id`` when an image
        does not decode."""
        return self.prompt.pixels(self, images, sample_id)

    def encode(self, sample: Sample, with_target: bool) -> tuple[list[int], int]:
        """Token ids of one sample in the prompt style and the length of its prompt part (labels start there).

        The question is cut from the left when the whole would exceed ``cfg.max_length``.
        """
        return self.prompt.encode(self, sample, with_target)

    def collate(self, samples: Sequence[Sample], train: bool, pixels: bool = True) -> dict[str, torch.Tensor]:
        """Batch ``samples``.

        Returns ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[B, L]``, ``pixel_values``
        ``[N_img, 3, S, S]`` (every sample's images in order) and, when ``train``, ``labels`` ``[B, L]``
        (-100 on prompt and padding). Training batches are right-padded, generation batches
        (``train=False``, no target) left-padded. ``pixels=False`` leaves the images undecoded (no
        ``pixel_values``; the caller brings CLIP states or image features).
        """
        if not samples:
            raise ValueError("cannot collate an empty batch")
        encoded = [self.encode(s, with_target=train) for s in samples]
        pixel_values = torch.cat([self.preprocess_images(s.images, s.id) for s in samples]) if pixels else None
        L = max(len(ids) for ids, _ in encoded)
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(encoded):
            t = torch.tensor(ids, dtype=torch.long)
            sl = slice(0, len(ids)) if train else slice(L - len(ids), L)
            input_ids[b, sl] = t
            mask[b, sl] = 1
            if train:
                labels[b, n_prompt:len(ids)] = t[n_prompt:]
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": _positions(mask)}
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values.to(self.dtype)
        if train:
            batch["labels"] = labels
        return batch

    # ------------------------------------------------------------------ forward
    def vision_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden state ``vision_feature_layer`` without CLS: ``[N_img, k, vision_hidden]``.

        Reusable across passes over the same images while no adapter touches the vision tower.
        """
        c = self.model.config
        out = self.model.model.vision_tower(pixel_values.to(self.device, self.dtype), output_hidden_states=True,
                                            return_dict=True)
        h = out.hidden_states[c.vision_feature_layer]
        return h[:, 1:] if c.vision_feature_select_strategy == "default" else h

    def embed(self, batch: dict[str, torch.Tensor], vision_states: torch.Tensor | None = None,
              image_features: ImageFeatures | None = None) -> torch.Tensor:
        """Token embeddings with projected image features at the ``<image>`` positions: ``[B, L, H]``.

        ``image_features``: already projected features ``[N_img, k, H]``, or a function of the batch's
        ``pixel_values`` returning them (e.g. a per-row projector, :mod:`cl_service.engine.multilora`);
        it replaces the CLIP pass and the model's own projector.
        """
        ids = batch["input_ids"].to(self.device)
        emb = self.model.get_input_embeddings()(ids)
        if image_features is not None:
            feats = image_features(batch["pixel_values"]) if callable(image_features) else image_features
            feats = feats.to(emb.dtype)
        else:
            if vision_states is None:
                vision_states = self.vision_states(batch["pixel_values"])
            feats = self.model.model.multi_modal_projector(vision_states).to(emb.dtype)
        slots = ids == self.image_token_id
        if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(slots.sum())} image tokens but {feats.shape[0]}×{feats.shape[1]} image features")
        return emb.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    def forward(self, batch: dict[str, torch.Tensor], vision_states: torch.Tensor | None = None, **kw):
        """Full forward (``loss`` when ``labels`` are in the batch, ``logits`` ``[B, L, V]``)."""
        labels = batch.get("labels")
        return self.model(
            inputs_embeds=self.embed(batch, vision_states),
            attention_mask=batch["attention_mask"].to(self.device),
            position_ids=batch["position_ids"].to(self.device),
            labels=None if labels is None else labels.to(self.device),
            **kw,
        )

    __call__ = forward

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean token cross-entropy over the answer tokens of a training batch.

        The same number as ``forward(batch).loss`` (transformers' shifted, mean-reduced causal LM loss),
        but the output head runs only at the positions that predict a label: a training sequence is
        mostly image and prompt tokens, so the full ``[B, L, V]`` logits (and their float32 copy) were
        ~8% of a tiny model's step and ~0.7 GB at 7B × batch 8, all for ignored positions.
        """
        labels = batch["labels"].to(self.device)
        h = self.model.model.language_model(
            inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"].to(self.device),
            position_ids=batch["position_ids"].to(self.device), use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE
        if not bool(keep.any()):
            raise ValueError("training batch has no answer tokens to learn (every label is ignored)")
        logits = self.model.lm_head(h[:, :-1][keep]).float()
        return torch.nn.functional.cross_entropy(logits, target[keep])

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int = 16, batch_size: int = 64,
                 vision_states: torch.Tensor | None = None, image_features: ImageFeatures | None = None,
                 decoder: StepDecoder | None = None, on_token: Callable[[int, int], None] | None = None) -> list[str]:
        """Greedy answers, one string per sample (special tokens dropped, stripped); the loop and its KV cache
        live in :mod:`cl_service.models.generate`.

        Batched with left padding and a KV cache; deterministic. ``vision_states`` (from
        :meth:`vision_states` over the same samples' images) skips the CLIP pass; ``image_features``
        (see :meth:`embed`) replaces CLIP and projector; a tensor of either needs
        ``batch_size >= len(samples)``. ``decoder``: runs the decode steps instead of the model's own
        forward (:class:`cl_service.engine.cudagraphs.GraphDecoder`: replayed CUDA graphs); it may
        decline a batch, which then decodes here as without it. ``on_token(i, token)``: called with sample
        ``i``'s tokens as they are decoded (EOS included, nothing after it), e.g. to stream an answer.
        """
        return _greedy(self, samples, max_new_tokens, batch_size, vision_states, image_features, decoder, on_token)

    @torch.no_grad()
    def pooled_features(self, samples: Sequence[Sample], batch_size: int = 64,
                        vision_states: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the decoder's last hidden state (after the final norm) over all prompt tokens, image
        tokens included: ``[B, H]`` float32 on CPU. Computed with whatever adapter is active; wrap in
        :meth:`adapters_disabled` for base features (the prototype router's). ``vision_states`` as in
        :meth:`generate` (needs ``batch_size >= len(samples)``)."""
        was_training = self.model.training
        self.model.eval()
        if vision_states is not None and len(samples) > batch_size:
            raise ValueError("precomputed vision_states need batch_size >= len(samples)")
        try:
            feats = []
            for i in range(0, len(samples), batch_size):
                batch = self.collate(samples[i:i + batch_size], train=False, pixels=vision_states is None)
                mask = batch["attention_mask"].to(self.device)
                h = self.model.model.language_model(
                    inputs_embeds=self.embed(batch, vision_states), attention_mask=mask,
                    position_ids=batch["position_ids"].to(self.device), use_cache=False).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                feats.append(((h * m).sum(1) / m.sum(1)).float().cpu())
            return torch.cat(feats)
        finally:
            self.model.train(was_training)

    def question_features(self, samples: Sequence[Sample], batch_size: int = 64) -> torch.Tensor:
        """Routing features ``[B, H_text + H_vision]`` float32 on CPU: the decoder's last hidden state
        mean-pooled over the question's tokens (image tokens excluded), next to the mean CLIP state of the
        sample's images. Keeps the question's signal from being drowned by the image tokens."""
        return self._question_and_images(samples, batch_size, alone=False)

    def routing_features(self, samples: Sequence[Sample], batch_size: int = 64,
                         vision_states: torch.Tensor | None = None) -> torch.Tensor:
        """Routing features ``[B, H_text + H_vision]`` float32 on CPU: the question run through the decoder
        *alone* (no image tokens), its last hidden state mean-pooled over the question's tokens, next to the
        mean CLIP state of the sample's images. Unlike :meth:`question_features` the question's part does not
        see the image, so a test split whose look shifts moves only the image part. ``vision_states``: the
        samples' CLIP states ``[N_img, k, H_vision]`` already computed (a server's stage two reuses them), so
        routing costs one short text-only pass; needs ``batch_size >= len(samples)``."""
        if vision_states is not None and len(samples) > batch_size:
            raise ValueError("precomputed vision_states need batch_size >= len(samples)")
        return self._question_and_images(samples, batch_size, alone=True, vision_states=vision_states)

    @torch.no_grad()
    def _question_and_images(self, samples: Sequence[Sample], batch_size: int, alone: bool,
                             vision_states: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder state pooled over each question's tokens (the question after its image tokens, or
        ``alone``) next to each sample's mean CLIP state: ``[B, H_text + H_vision]``."""
        was_training = self.model.training
        self.model.eval()
        try:
            feats = []
            for i in range(0, len(samples), batch_size):
                chunk = samples[i:i + batch_size]
                if alone:
                    batch = self.collate([dataclasses.replace(s, images=[]) for s in chunk], train=False, pixels=False)
                    vs = vision_states if vision_states is not None else self.vision_states(
                        torch.cat([self.preprocess_images(s.images, s.id) for s in chunk]))
                    inputs = {"input_ids": batch["input_ids"].to(self.device)}
                else:
                    batch = self.collate(chunk, train=False)
                    vs = self.vision_states(batch["pixel_values"])
                    inputs = {"inputs_embeds": self.embed(batch, vs)}
                ids = batch["input_ids"].to(self.device)
                mask = batch["attention_mask"].to(self.device)
                h = self.model.model.language_model(
                    **inputs, attention_mask=mask, position_ids=batch["position_ids"].to(self.device),
                    use_cache=False).last_hidden_state
                text = (mask.bool() & (ids != self.image_token_id) & (ids != self.bos_id)).unsqueeze(-1).to(h.dtype)
                pooled = (h * text).sum(1) / text.sum(1).clamp(min=1)
                feats.append(torch.cat([pooled.float(), self._mean_clip(vs, chunk).float()], dim=-1).cpu())
            return torch.cat(feats)
        finally:
            self.model.train(was_training)

    @staticmethod
    def _mean_clip(vs: torch.Tensor, chunk: Sequence[Sample]) -> torch.Tensor:
        """``[B, H_vision]``: each sample's CLIP states ``vs`` (``[N_img, k, H]``, images in sample order)
        averaged over its tokens and images."""
        per_image = vs.mean(1)  # [N_img, H_vision]
        counts = torch.tensor([len(s.images) for s in chunk], device=per_image.device)
        owner = torch.repeat_interleave(torch.arange(len(chunk), device=per_image.device), counts)
        clip = torch.zeros(len(chunk), per_image.shape[-1], dtype=per_image.dtype, device=per_image.device)
        clip.index_add_(0, owner, per_image)
        return clip / counts.clamp(min=1).unsqueeze(-1).to(clip.dtype)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save atomically in the Hugging Face LLaVA layout (``config.json``, ``model.safetensors``,
        tokenizer files) plus ``clsvc_model.json`` (the :class:`ModelCfg`). Only a plain base can be
        saved; adapters are saved with :func:`cl_service.adapters.lora.save_adapter`."""
        if self.peft is not None:
            raise ValueError("this MLLM has LoRA adapters attached; save the base before attaching them")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        cfg = {**json.loads(self.cfg.to_json()), "path": None}
        (tmp / MODEL_CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        replace_dir(tmp, path)
        return path


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build_mllm(cfg: ModelCfg, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
               device: str | torch.device | None = None) -> MLLM:
    """A randomly initialised MLLM of shape ``cfg`` (deterministic in ``seed``; global RNG untouched).
    Like :func:`load_mllm`, it comes frozen (no parameter requires grad) and in eval mode.

    ``device`` (e.g. ``"cuda"``): build and initialise there, directly in ``cfg.dtype`` (a 7B model
    initialises in seconds on a GPU instead of minutes in float32 on the CPU)."""
    if device is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(llava_config(cfg, tokenizer))
    else:
        device = torch.device(device)
        old = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            torch.set_default_dtype(_dtype(cfg.dtype))
            try:
                with device:
                    model = LlavaForConditionalGeneration(llava_config(cfg, tokenizer))
            finally:
                torch.set_default_dtype(old)
    model.to(_dtype(cfg.dtype))
    model.eval().requires_grad_(False)
    return MLLM(model, tokenizer, cfg)


def load_mllm(path: str | Path, dtype: str | None = None, device: str | torch.device | None = None,
              prompt_style: str = "auto") -> MLLM:
    """Load a local checkpoint in the Hugging Face LLaVA layout (ours or a real one); never downloads.

    Our saved bases carry ``clsvc_model.json``; for other checkpoints the :class:`ModelCfg` is derived
    from ``config.json`` and the image normalisation from ``preprocessor_config.json`` when present.
    ``prompt_style`` (``BaseCfg.prompt_style``): ``auto`` | ``clsvc`` | ``llava-hf`` | ``mllm-cl``, see
    :func:`cl_service.models.prompting.resolve_style`; ``llava-hf``/``mllm-cl`` use the folder's processor
    (its tokenizer, chat template and image processor).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    hf = LlavaConfig.from_pretrained(path)
    meta = path / MODEL_CFG_FILE
    if meta.is_file():
        cfg = ModelCfg.from_dict(json.loads(meta.read_text()))
    else:
        v, t = hf.vision_config, hf.text_config
        cfg = ModelCfg(
            name=path.name, image_size=v.image_size, patch_size=v.patch_size, vision_hidden=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
            vision_intermediate=v.intermediate_size, text_hidden=t.hidden_size, text_layers=t.num_hidden_layers,
            text_heads=t.num_attention_heads, text_kv_heads=t.num_key_value_heads or t.num_attention_heads,
            text_intermediate=t.intermediate_size, vocab_size=t.vocab_size,
            max_length=min(4096, int(getattr(t, "max_position_embeddings", 4096) or 4096)),
            vision_feature_layer=hf.vision_feature_layer if isinstance(hf.vision_feature_layer, int) else -2,
            dtype=dtype or "float32")
    cfg = ModelCfg.from_dict({**json.loads(cfg.to_json()), "path": str(path), **({"dtype": dtype} if dtype else {})})
    on_gpu = device is not None and torch.device(device).type == "cuda"
    # On a GPU the weights go straight to it (a 7B base is 14 GB: no second copy through host memory).
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=_dtype(cfg.dtype), local_files_only=True,
                                                          **({"device_map": {"": torch.device(device)}} if on_gpu else {}))
    if device is not None and not on_gpu:
        model.to(device)
    model.eval().requires_grad_(False)
    prompt, tokenizer = load_format(resolve_style(path, prompt_style), path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    pp = path / "preprocessor_config.json"
    if pp.is_file():
        p = json.loads(pp.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    ip = getattr(prompt, "image_processor", None)
    if ip is not None:
        mean, std = ip.image_mean, ip.image_std
        crop = getattr(ip, "crop_size", None) or {}
        side = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        if getattr(ip, "do_center_crop", False) and side not in (None, hf.vision_config.image_size):
            raise ValueError(f"{path}: the image processor crops to {side} px but the vision tower takes "
                             f"{hf.vision_config.image_size} px")
    return MLLM(model, tokenizer, cfg, mean, std, prompt=prompt)
