"""A small byte-level BPE tokenizer trained offline, wrapped as a transformers fast tokenizer.

Byte-level, so any text (real data, other scripts, emoji) tokenizes without unknown tokens; the
merges only decide how compactly. Training is deterministic for a given corpus order and vocab size.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
#: Special tokens in id order: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<image>`` = 3.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it.

    The full 256-byte alphabet is always in the vocabulary; ``vocab_size`` counts bytes, merges and the
    four special tokens. Words get a leading-space variant (``" yes"`` is one token when frequent),
    which is how answers appear after the prompt.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A list, not a generator: the trainer then sees one fixed order (determinism).
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` that holds :data:`SPECIAL_TOKENS` as a transformers tokenizer."""
    for t in SPECIAL_TOKENS:
        if tok.token_to_id(t) is None:
            raise ValueError(f"tokenizer lacks the special token {t!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
