"""An OpenAI chat-completions request body as a ``cl.v1.PredictRequest``: every field honoured or refused.

Honoured: ``model`` (``auto`` routes; an expert's task name or adapter id answers with it), ``messages`` (user
messages; their images, in order, are the request's images, their texts joined by newlines the question),
``max_tokens`` / ``max_completion_tokens`` (= ``max_new_tokens``), ``stream`` and ``stream_options.include_usage``,
and the settings that describe what the server does anyway: answers are greedy, so ``temperature`` 0, ``top_p``
1, ``n`` 1, no penalties, no logprobs, and any ``seed`` (greedy decoding is deterministic). Anything else is
refused with 400 naming the field (``temperature: 0.7``, ``stop``, ``tools``, ``logprobs``, a ``system``
message: the run fixes the prompt, ...), never ignored: a client that asks for sampling, stop sequences or a
system prompt would otherwise get an answer made without them. Unknown fields are refused too.

Images are inline (``data:image/png;base64,...`` or bare base64); the server fetches no URL. Raises
:class:`HttpError`; image bytes, question and ``max_new_tokens`` are validated further by the request core.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Callable

from cl_service.serve.catalog import Limits
from cl_service.serve.proto import load as load_proto

pb2, _ = load_proto()

AUTO = "auto"


class HttpError(Exception):
    """A request refused before it reaches the request core."""

    def __init__(self, status: int, message: str, code: str = "invalid_argument", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(frozen=True)
class Chat:
    """A parsed chat-completions request."""
    request: Any            # cl.v1.PredictRequest
    stream: bool
    include_usage: bool     # stream_options.include_usage: a last chunk with the token counts


def _none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _is(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(type(v) is type(a) and v == a or (type(a) is float and type(v) is int
                                                                          and v == a) for a in allowed)


_GREEDY = "answers are greedy (one deterministic choice, as in the run's evaluation)"

#: Fields with what is accepted (beyond what the server does anyway, a 400 names the field and says why).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is(1), f"only 1: {_GREEDY}"),
    "temperature": (_is(0.0), f"only 0: {_GREEDY}"),
    "top_p": (_is(1.0), f"only 1: {_GREEDY}"),
    "presence_penalty": (_is(0.0), f"only 0: {_GREEDY}"),
    "frequency_penalty": (_is(0.0), f"only 0: {_GREEDY}"),
    "logit_bias": (_empty, f"not supported: {_GREEDY}"),
    "logprobs": (_is(False), "not supported: the server returns no log-probabilities"),
    "top_logprobs": (_is(0), "not supported: the server returns no log-probabilities"),
    "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
             "an integer (any seed gives the same answer: decoding is greedy)"),
    "stop": (_empty, "stop sequences are not supported (an answer ends at the model's end of sequence or max_tokens)"),
    "tools": (_empty, "tools are not supported: the experts answer questions about images, they call nothing"),
    "tool_choice": (_is("none"), "only 'none': tools are not supported"),
    "functions": (_empty, "functions are not supported"),
    "function_call": (_is("none"), "only 'none': functions are not supported"),
    "parallel_tool_calls": (_none, "tools are not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "only {'type': 'text'}"),
    "modalities": (lambda v: v is None or v == ["text"], "only ['text']"),
    "audio": (_none, "audio output is not supported"),
    "prediction": (_none, "predicted outputs are not supported"),
    "reasoning_effort": (_none, "not supported: the experts do not reason in steps"),
    "web_search_options": (_none, "web search is not supported"),
    "service_tier": (_is("auto", "default"), "only 'auto' or 'default': one tier"),
    "store": (_is(False), "not supported: the server stores no completions"),
    "metadata": (_empty, "not supported: the server stores no completions"),
    "user": (_none, "not supported: the server keeps no per-user records"),
}
#: Fields read below.
HANDLED = ("model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options")


def parse_chat(body: bytes, limits: Limits) -> Chat:
    """A chat-completions body as a :class:`Chat`; raises :class:`HttpError` naming the field."""
    try:
        obj = json.loads(body)
    except RecursionError:
        raise HttpError(400, "request body: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise HttpError(400, f"request body: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HttpError(400, "request body: must be a JSON object")
    for key, value in obj.items():
        if key in HANDLED:
            continue
        if key not in RULES:
            raise HttpError(400, f"{_clip(key)}: unknown field (the server refuses what it would not honour)",
                            param=key)
        ok, why = RULES[key]
        if not ok(value):
            raise HttpError(400, f"{key}: {_clip(json.dumps(value))} is not supported; {why}", param=key)
    model = obj.get("model", AUTO)
    if not isinstance(model, str) or not model.strip():
        raise HttpError(400, "model: must be 'auto' or an expert's name (GET /v1/models lists them)", param="model")
    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise HttpError(400, "stream: must be true or false", param="stream")
    include_usage = _stream_options(obj.get("stream_options"), stream)
    max_tokens = _max_tokens(obj, limits)
    images, question = _messages(obj.get("messages"), limits)
    request = pb2.PredictRequest(images=images, question=question)
    if model.strip() != AUTO:
        request.expert = model.strip()
    if max_tokens is not None:
        request.max_new_tokens = max_tokens
    return Chat(request, stream, include_usage)


def _stream_options(opts: Any, stream: bool) -> bool:
    if opts is None:
        return False
    if not stream:
        raise HttpError(400, "stream_options: only with stream: true", param="stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
            opts.get("include_usage", False), bool):
        raise HttpError(400, "stream_options: only {'include_usage': true|false}", param="stream_options")
    return bool(opts.get("include_usage", False))


def _max_tokens(obj: dict, limits: Limits) -> int | None:
    given = {k: obj[k] for k in ("max_completion_tokens", "max_tokens") if obj.get(k) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise HttpError(400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens")
    for key, n in given.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_new_tokens:
            raise HttpError(400, f"{key}: {_clip(repr(n))} is outside [1, {limits.max_new_tokens}]", param=key)
        return n
    return None


def _messages(messages: Any, limits: Limits) -> tuple[list[bytes], str]:
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages: a non-empty list of messages is required", param="messages")
    images: list[bytes] = []
    texts: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise HttpError(400, f"{where}: a message object is required", param=where)
        role = m.get("role")
        if role in ("system", "developer"):
            raise HttpError(400, f"{where}.role: {role!r} messages are not supported: the run fixes the prompt "
                                 "its experts were trained with; put the question in a user message",
                            param=f"{where}.role")
        if role != "user":
            raise HttpError(400, f"{where}.role: {_clip(repr(role))} is not supported; send user messages only "
                                 "(one question about the images, no multi-turn conversation)", param=f"{where}.role")
        extra = set(m) - {"role", "content", "name"}
        if extra or m.get("name") is not None:
            key = sorted(extra)[0] if extra else "name"
            raise HttpError(400, f"{where}.{_clip(key)}: not supported", param=f"{where}.{key}")
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise HttpError(400, f"{where}.content: a string or a list of content parts", param=f"{where}.content")
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
                texts.append(part["text"])
            elif kind == "image_url" and set(part) <= {"type", "image_url"}:
                url = part.get("image_url")
                if isinstance(url, dict):
                    if set(url) - {"url", "detail"} or url.get("detail") not in (None, "auto"):
                        raise HttpError(400, f"{at}.image_url: only 'url' (and detail 'auto': the model sees every "
                                             "image at its own resolution)", param=at)
                    url = url.get("url")
                if not isinstance(url, str):
                    raise HttpError(400, f"{at}.image_url.url: a data URL string is required", param=at)
                images.append(_image(url, f"{at}.image_url.url", limits))
            else:
                raise HttpError(400, f"{at}: unsupported content part {_clip(repr(kind))} (use 'text' or "
                                     "'image_url' with their own keys only)", param=at)
    return images, "\n".join(t for t in texts if t.strip())


def _image(url: str, where: str, limits: Limits) -> bytes:
    """The bytes of a ``data:<mime>;base64,<data>`` URL or of bare base64 (no URL is fetched)."""
    data = url
    if url[:5].lower() == "data:":
        head, sep, data = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise HttpError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)", param=where)
    elif url.split(":", 1)[0].lower() in ("http", "https", "file", "ftp", "s3", "gs"):
        raise HttpError(400, f"{where}: the server fetches no URL; send the image inline as "
                             "data:image/png;base64,...", param=where)
    data = "".join(data.split())
    if len(data) // 4 * 3 - 2 > limits.max_image_bytes:  # refused before decoding
        raise HttpError(413, f"{where}: about {len(data) // 4 * 3} bytes, over the limit of "
                             f"{limits.max_image_bytes}", "request_too_large", where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{where}: not valid base64", param=where) from None
    if len(raw) > limits.max_image_bytes:
        raise HttpError(413, f"{where}: {len(raw)} bytes, over the limit of {limits.max_image_bytes}",
                        "request_too_large", where)
    return raw


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."
