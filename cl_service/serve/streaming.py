"""An answer's text as its tokens arrive: the pieces a streamed reply sends, which add up to the whole answer.

The engine's answer is ``tokenizer.decode(tokens before EOS, skip_special_tokens=True).strip()``. Decoding
token by token does not add up to that in general: a token may end inside a multi-byte character (decoded as
U+FFFD until the next one completes it), and stripping drops whitespace that a later token may make inner.
:class:`TextStream` decodes the whole prefix at each token and sends only what can no longer change: never a
trailing U+FFFD, never trailing whitespace (the next word carries it), nothing when the prefix's text does
not extend what was sent. :meth:`TextStream.end` sends the rest of the final answer; when that answer does not
extend what was sent, it raises instead of letting a client assemble a wrong answer.
"""

from __future__ import annotations

from typing import Any


class StreamMismatch(RuntimeError):
    """The pieces sent so far are not a prefix of the final answer."""


class TextStream:
    """Text pieces of one answer from its token ids (``push``), then the rest (``end``)."""

    def __init__(self, tokenizer: Any, eos_id: int | None) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, token: int) -> str:
        """The text that ``token`` adds and that no later token can change ("" when none yet)."""
        if self.done:
            return ""
        if token == self.eos_id:
            self.done = True
            return ""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip().rstrip("\ufffd").rstrip()
        if not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def end(self, answer: str) -> str:
        """The rest of ``answer`` after the pieces sent; raises :class:`StreamMismatch` if they are not its start."""
        if not answer.startswith(self.sent):
            raise StreamMismatch(f"streamed {len(self.sent)} characters that do not start the answer")
        piece, self.sent = answer[len(self.sent):], answer
        return piece
