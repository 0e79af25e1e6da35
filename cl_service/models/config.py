"""Model profiles: the typed shape of a LLaVA-style MLLM (CLIP vision tower + projector + Llama decoder).

A profile either describes a model built from scratch (``tiny``: random init, then the base
pre-training of :mod:`cl_service.models.pretrain`) or points at a local checkpoint in the Hugging Face
LLaVA layout (``path``), whose own ``config.json`` then wins over the dims listed here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from cl_service.registry import Registry


@dataclass(frozen=True)
class ModelCfg:
    """Shape and numerics of one MLLM. All sizes are for the model built from scratch."""

    name: str = "tiny"
    """Profile name (the model store keys bases by it)."""
    image_size: int = 64
    """Side of the square model input in pixels; every image is resized to it."""
    patch_size: int = 8
    """ViT patch side; ``(image_size // patch_size) ** 2`` image tokens per image."""
    vision_hidden: int = 128
    """CLIP vision tower width."""
    vision_layers: int = 3
    """CLIP encoder layers. With ``vision_feature_layer=-2`` the last one is not used by the decoder."""
    vision_heads: int = 4
    """CLIP attention heads."""
    vision_intermediate: int = 512
    """CLIP MLP width."""
    text_hidden: int = 256
    """Llama decoder width (also the projector's output width)."""
    text_layers: int = 4
    """Llama decoder layers."""
    text_heads: int = 4
    """Llama attention heads."""
    text_kv_heads: int = 4
    """Llama key/value heads (``< text_heads`` = grouped-query attention)."""
    text_intermediate: int = 512
    """Llama SwiGLU MLP width."""
    vocab_size: int = 1024
    """Target vocabulary of the byte-level BPE tokenizer trained for this profile (specials included)."""
    max_length: int = 320
    """Longest token sequence (prompt with image tokens + answer); longer prompts are cut from the left
    of the question text, never inside an image block."""
    vision_feature_layer: int = -2
    """CLIP hidden state fed to the projector (-2 = the penultimate layer, as in LLaVA-1.5)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the built/loaded model."""
    path: str | None = None
    """Local Hugging Face LLaVA checkpoint directory; when set the model is loaded, not built."""

    @property
    def tokens_per_image(self) -> int:
        """Image tokens one image occupies in the prompt (CLS dropped, LLaVA's ``default`` strategy)."""
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCfg":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelCfg fields {unknown}; known: {sorted(known)}")
        return cls(**d)


PROFILES: Registry[ModelCfg] = Registry("model profile")

#: 3.82M parameters (vocab ~920 from the built-in corpus; 64 image tokens, ~85-token sequences). Measured on
#: the 2-core CPU machine: a base pre-training step (batch 32, CLIP frozen) ~1.1 s on 1 thread / ~0.5 s on 2;
#: a LoRA expert step (r16 decoder-only + projector, batch 16) ~0.55 s on 1 thread, so the default expert
#: recipe (10 epochs of 300 samples = 190 steps) takes ~1.7-2 min; base build ~3.5 min uncontended.
PROFILES.register("tiny", ModelCfg())

#: LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px: 576 image tokens, layer -2; 2-layer GELU projector;
#: Llama-7B decoder; 32064 vocabulary), bf16. For speed measurements only: built with random weights on
#: the GPU (``build_mllm(..., device="cuda")``, see ``bench/``), never downloaded; weights do not change speed.
PROFILES.register("llava-7b", ModelCfg(
    name="llava-7b", image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
    vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
    text_intermediate=11008, vocab_size=32064, max_length=2048, dtype="bfloat16"))
