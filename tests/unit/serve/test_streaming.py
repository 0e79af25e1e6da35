"""Streamed text adds up to the answer the engine returns, whatever the tokens: split characters, spaces,
special tokens, EOS; a final answer the pieces do not start is refused, never patched over."""

import random

import pytest

from cl_service.serve.streaming import StreamMismatch, TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def _answer(tok, ids, eos):
    """What the engine answers for generated ``ids`` (models/generate.py)."""
    row = ids[: ids.index(eos)] if eos in ids else ids
    return tok.decode(row, skip_special_tokens=True).strip()


def test_pieces_add_up_to_the_answer_for_random_token_sequences(tokenizer):
    """Random ids (byte tokens that split UTF-8 characters, merges with leading spaces, specials, EOS anywhere):
    no piece is ever taken back, and the pieces plus the end are exactly the engine's answer."""
    rng = random.Random(0)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    texts = ["  Ünïcode ✓ and émoji 🚀 ok  ", " yes", "no ", " a  b", "\u00e9\u00e9", "🚀🚀"]
    cases = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    cases += [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    cases += [c + [eos] + c for c in cases[:6]]
    split_chars = 0
    for ids in cases:
        stream = TextStream(tokenizer, eos)
        pieces = [stream.push(t) for t in ids]
        answer = _answer(tokenizer, ids, eos)
        assert "".join(pieces) + stream.end(answer) == answer, ids
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in answer
        split_chars += any(p == "" for p in pieces)
    assert split_chars > 0  # some tokens added nothing sendable yet (half a character, a trailing space)


def test_an_answer_the_pieces_do_not_start_is_refused(tokenizer):
    stream = TextStream(tokenizer, tokenizer.eos_token_id)
    sent = "".join(stream.push(t) for t in tokenizer(" hello world", add_special_tokens=False).input_ids)
    assert sent == "hello world"
    with pytest.raises(StreamMismatch):
        stream.end("goodbye world")
