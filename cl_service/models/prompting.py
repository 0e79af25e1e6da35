"""How a sample becomes token ids and pixels: the prompt styles of ``BaseCfg.prompt_style``.

Every path that feeds the model (training, generation, routing features, MultiLoRA, serving) goes through
:meth:`MLLM.encode <cl_service.models.mllm.MLLM.encode>` and :meth:`MLLM.preprocess_images`, which hand over
to the base's :class:`PromptFormat`:

``clsvc`` (:class:`ClsvcFormat`, our tiny bases)::

    <s><image>×(k·n) "\\n" question "\\nAnswer:"      target: " " answer "</s>"
    images stretched to image_size², CLIP-normalised

``llava-hf`` (:class:`LlavaHfFormat`, a llava-hf checkpoint as its ``LlavaProcessor`` uses it): the checkpoint's
chat template over one user turn (``n`` image parts, then the question) with the generation prompt
(``USER: <image>\\n{question} ASSISTANT:`` for llava-1.5), every ``<image>`` expanded to ``k`` tokens and the
whole tokenized as the processor does (special tokens added); target ``" " answer eos``; images through the
checkpoint's own image processor (shortest-edge resize, centre crop, its normalisation).

``mllm-cl`` (:class:`MllmClFormat`, the reference code's ``vicuna_v1`` conversation)::

    <system> USER: <image>\\n{question} ASSISTANT:      target: " " answer "</s>"

tokenized like the reference's ``tokenizer_image_token`` (text between image tokens tokenized piece by
piece, ``<s>`` only in front); images padded to a square in CLIP's mean colour, then the checkpoint's image
processor. ``k`` = image tokens per image, ``n`` = the sample's images. Too long a sample loses the start of
its question (never the template, an image block or the answer).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cl_service.data.schema import Sample

if TYPE_CHECKING:
    from cl_service.models.mllm import MLLM

STYLES = ("clsvc", "llava-hf", "mllm-cl")
#: Written next to ``config.json`` by ``clsvc base assemble``: ``{"prompt_style": "mllm-cl"}`` is what
#: ``prompt_style: auto`` picks for that folder.
PROMPT_HINT_FILE = "clsvc_prompt.json"
ANSWER_CUE = "\nAnswer:"
#: The ``vicuna_v1`` system line of the reference code (LLaVA's ``conv_vicuna_v1``).
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE_TOKEN = "<image>"


def prompt_text(question: str) -> str:
    """``clsvc``: the text after the image blocks, ``"\\n" + question + "\\nAnswer:"``."""
    return "\n" + question.strip() + ANSWER_CUE


def target_text(answer: str, eos: str = "</s>") -> str:
    """The supervised continuation: ``" " + answer + eos``."""
    return " " + answer.strip() + eos


def vicuna_prompt(question: str, n_images: int = 1, answer: str | None = None, eos: str = "</s>") -> str:
    """The reference's ``vicuna_v1`` text: ``system + " USER: " + "<image>\\n"×n + question + " ASSISTANT:"``,
    then ``" " + answer + eos`` when ``answer`` is given."""
    text = VICUNA_SYSTEM + " USER: " + (IMAGE_TOKEN + "\n") * n_images + question + " ASSISTANT:"
    return text if answer is None else text + target_text(answer, eos)


def resolve_style(path: str | Path | None, style: str = "auto") -> str:
    """The concrete style for a base folder: ``style`` unless ``auto``; then ``clsvc`` for bases built by
    cl-service (``clsvc_model.json``), the ``prompt_style`` of :data:`PROMPT_HINT_FILE` when present
    (assembled bases: ``mllm-cl``), else ``llava-hf``."""
    if style != "auto":
        if style not in STYLES:
            raise ValueError(f"unknown prompt_style {style!r}; known: auto, {', '.join(STYLES)}")
        return style
    if path is None:
        return "clsvc"
    path = Path(path)
    if (path / "clsvc_model.json").is_file():
        return "clsvc"
    hint = path / PROMPT_HINT_FILE
    if hint.is_file():
        return resolve_style(path, json.loads(hint.read_text()).get("prompt_style", "llava-hf"))
    return "llava-hf"


def decode_image(data: bytes, i: int, sample_id: str) -> Image.Image:
    """Encoded bytes → an RGB PIL image; ``ValueError`` naming the sample when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"sample {sample_id!r}: image {i} does not decode ({type(e).__name__}: {e})") from None


def expand2square(im: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The reference's ``expand2square``: pad the short side (content centred) with ``fill``."""
    w, h = im.size
    if w == h:
        return im
    out = Image.new(im.mode, (max(w, h),) * 2, fill)
    out.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


class PromptFormat(Protocol):
    """One prompt style: ids of a sample and pixels of its images."""

    name: str

    def encode(self, m: "MLLM", sample: Sample, with_target: bool) -> tuple[list[int], int]:
        """Token ids of ``sample`` (prompt, then target when ``with_target``) and the prompt's length."""

    def pixels(self, m: "MLLM", images: Sequence[bytes], sample_id: str) -> torch.Tensor:
        """Encoded images → ``[n, 3, S, S]`` float32, ready for the vision tower."""


def _stack(out: list[torch.Tensor], sample_id: str) -> torch.Tensor:
    if not out:
        raise ValueError(f"sample {sample_id!r} has no image")
    return torch.stack(out)


def _resize_normalise(m: "MLLM", im: Image.Image) -> torch.Tensor:
    if im.size != (m.image_size, m.image_size):
        im = im.resize((m.image_size, m.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - m._mean) / m._std


class ClsvcFormat:
    """Our tiny bases' format (module docstring); the reference for bit-identical results."""

    name = "clsvc"

    def encode(self, m: "MLLM", sample: Sample, with_target: bool) -> tuple[list[int], int]:
        tok = m.tokenizer
        head = [m.bos_id] + [m.image_token_id] * (m.tokens_per_image * len(sample.images))
        prompt = tok(prompt_text(sample.question), add_special_tokens=False).input_ids
        target = (tok(target_text(sample.answer, tok.eos_token), add_special_tokens=False).input_ids
                  if with_target else [])
        room = m.cfg.max_length - len(head) - len(target)
        if room < 4:
            raise ValueError(f"sample {sample.id!r}: {len(sample.images)} image(s) and the answer do not fit "
                             f"max_length={m.cfg.max_length}")
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room:]
        return head + prompt + target, len(head) + len(prompt)

    def pixels(self, m: "MLLM", images: Sequence[bytes], sample_id: str) -> torch.Tensor:
        return _stack([_resize_normalise(m, decode_image(d, i, sample_id)) for i, d in enumerate(images)], sample_id)


class _ChatFormat:
    """A chat-style prompt: ``prompt_string`` gives the text, ``_ids`` tokenizes it with image tokens expanded."""

    name = ""

    def __init__(self, image_processor: Any | None) -> None:
        self.image_processor = image_processor

    def prompt_string(self, m: "MLLM", question: str, n_images: int) -> str:
        raise NotImplementedError

    def _ids(self, m: "MLLM", text: str) -> list[int]:
        raise NotImplementedError

    def _prepare(self, m: "MLLM", im: Image.Image) -> Image.Image:
        return im

    def encode(self, m: "MLLM", sample: Sample, with_target: bool) -> tuple[list[int], int]:
        n = len(sample.images)
        tail = target_text(sample.answer, m.tokenizer.eos_token) if with_target else ""

        def build(q: str) -> tuple[list[int], list[int]]:
            text = self.prompt_string(m, q, n)
            p = self._ids(m, text)
            return p, (self._ids(m, text + tail) if tail else p)

        q = sample.question
        prompt, full = build(q)
        limit = m.cfg.max_length
        if len(full) > limit:
            if len(build("")[1]) + 4 > limit:
                raise ValueError(f"sample {sample.id!r}: {n} image(s) and the answer do not fit max_length={limit}")
            lo, hi = 1, len(q)  # fewest leading characters of the question to drop
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if len(build(q[mid:])[1]) <= limit else (mid + 1, hi)
            prompt, full = build(q[lo:])
        n_prompt = 0  # labels start where the two tokenizations part (the prompt's end as a rule)
        while n_prompt < min(len(prompt), len(full)) and prompt[n_prompt] == full[n_prompt]:
            n_prompt += 1
        return full, n_prompt

    def pixels(self, m: "MLLM", images: Sequence[bytes], sample_id: str) -> torch.Tensor:
        ims = [self._prepare(m, decode_image(d, i, sample_id)) for i, d in enumerate(images)]
        if self.image_processor is None:
            return _stack([_resize_normalise(m, im) for im in ims], sample_id)
        if not ims:
            raise ValueError(f"sample {sample_id!r} has no image")
        out = self.image_processor(images=ims, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out).float()


class LlavaHfFormat(_ChatFormat):
    """The checkpoint's chat template and processor (module docstring)."""

    name = "llava-hf"

    def __init__(self, processor: Any) -> None:
        super().__init__(processor.image_processor)
        self.processor = processor
        self.image_token = getattr(processor, "image_token", IMAGE_TOKEN) or IMAGE_TOKEN

    def prompt_string(self, m: "MLLM", question: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _ids(self, m: "MLLM", text: str) -> list[int]:
        # LlavaProcessor.__call__: each image token becomes k of them, then the tokenizer's defaults
        return m.tokenizer(text.replace(self.image_token, self.image_token * m.tokens_per_image)).input_ids


class MllmClFormat(_ChatFormat):
    """The reference code's ``vicuna_v1`` conversation and ``pad`` images (module docstring)."""

    name = "mllm-cl"

    def prompt_string(self, m: "MLLM", question: str, n_images: int) -> str:
        return vicuna_prompt(question, n_images)

    def _ids(self, m: "MLLM", text: str) -> list[int]:
        # the reference's tokenizer_image_token: pieces between images tokenized alone, their <s> dropped
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            part = m.tokenizer(piece).input_ids
            if i > 0:
                ids += [m.image_token_id] * m.tokens_per_image
                if part and part[0] == m.bos_id:
                    part = part[1:]
            ids += part
        if m.bos_id is not None and ids[:1] != [m.bos_id]:  # a tokenizer that adds no <s> (our byte-level BPE)
            ids = [m.bos_id] + ids
        return ids

    def _prepare(self, m: "MLLM", im: Image.Image) -> Image.Image:
        mean = getattr(self.image_processor, "image_mean", None) or m._mean.flatten().tolist()
        return expand2square(im, tuple(int(x * 255) for x in mean))


def load_format(style: str, path: str | Path | None) -> tuple[PromptFormat, Any | None]:
    """The :class:`PromptFormat` of a concrete ``style`` for the checkpoint at ``path``, and the tokenizer its
    processor carries (None when the folder has no processor)."""
    if style == "clsvc":
        return ClsvcFormat(), None
    processor = _load_processor(path) if path is not None else None
    if style == "llava-hf":
        if processor is None or not getattr(processor, "chat_template", None):
            raise ValueError(f"prompt_style 'llava-hf' needs the checkpoint's processor and chat template, "
                             f"and {path} has none (AutoProcessor did not load one); use prompt_style 'mllm-cl'")
        return LlavaHfFormat(processor), processor.tokenizer
    if style == "mllm-cl":
        ip = getattr(processor, "image_processor", None) if processor is not None else _load_image_processor(path)
        return MllmClFormat(ip), (processor.tokenizer if processor is not None else None)
    raise ValueError(f"unknown prompt_style {style!r}; known: {', '.join(STYLES)}")


def _load_processor(path: str | Path) -> Any | None:
    from transformers import AutoProcessor

    try:
        p = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None
    return p if hasattr(p, "image_processor") and hasattr(p, "tokenizer") else None


def _load_image_processor(path: str | Path | None) -> Any | None:
    if path is None or not (Path(path) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def first_answer_tokens(m: "MLLM", answers: Sequence[str]) -> dict[str, int]:
    """For each answer (e.g. a router letter), the id of the first token the model emits for it right after
    the prompt: the first target token whose text contains the answer (so a bare ``▁``/``Ġ`` before it is
    skipped), found by encoding a one-answer sample in the base's own prompt style."""
    out = {}
    for a in answers:
        ids, n = m.encode(Sample("?", "test", "letter", [], "?", [a], "exact"), with_target=True)
        target = ids[n:]
        out[a] = next((t for t in target if a in m.tokenizer.decode([t])), target[0])
    return out
