"""Fuzzing Predict on the plain gRPC server (loopback, tiny 2-task run), bounded in cases and time.

Mutated and random requests: truncated and corrupt images of every format Pillow writes here (PNG, JPEG, GIF,
BMP, TIFF, WEBP), decompression bombs, empty and huge questions, invalid UTF-8 (sent as raw bytes: the
client's protobuf refuses to encode it), corrupt wire format, too many images, out-of-range
``max_new_tokens``, unknown experts, missing and wrong tokens. Never ``INTERNAL`` (or ``UNKNOWN``), never a
traceback in the details, and a valid request is answered exactly as before afterwards.
"""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image

from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(150)

TOKEN = "fuzz-token"
BUDGET_S = 25.0     # the fuzz loop stops after this long ...
MAX_CASES = 1000    # ... or this many cases
MIN_CASES = 60      # and must have run at least this many
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
PREDICT = "/cl.v1.ContinualLearning/Predict"


def _encoded(fmt: str, rng: random.Random, size: int = 24) -> bytes | None:
    im = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (KeyError, OSError, ValueError):  # this Pillow build cannot write it
        return None
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(w: int, h: int, rows: int | None = None) -> bytes:
    """A 1-bit greyscale PNG of ``w`` x ``h`` zeros (``rows`` of them actually present): tiny on the wire."""
    raw = (b"\0" + b"\0" * ((w + 7) // 8)) * (h if rows is None else rows)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def _gif_bomb() -> bytes:
    """A GIF whose logical screen is 65535 x 65535 around a 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b")


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0 and b:  # truncated
        return bytes(b[: rng.randrange(len(b))])
    if op == 1 and b:  # bytes flipped
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 2:  # garbage inserted
        at = rng.randrange(len(b) + 1)
        return bytes(b[:at]) + rng.randbytes(rng.randint(1, 64)) + bytes(b[at:])
    if op == 3 and len(b) > 16:  # a chunk zeroed
        at = rng.randrange(8, len(b))
        b[at: at + rng.randint(1, 256)] = b"\0" * len(b[at: at + 256])
        return bytes(b)
    if op == 4:  # header only
        return bytes(b[: rng.randint(1, 40)])
    return rng.randbytes(rng.randint(1, 2048))  # noise


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


@pytest.fixture(scope="module")
def fuzz_server(tiny_run, tiny_engine, dcl_shards):
    from cl_service.serve.service import ContinualLearningServicer, build_server

    servicer = ContinualLearningServicer(tiny_run, tiny_engine, token=TOKEN, limits__max_image_bytes=200_000,
                                         limits__max_images=4, watch_s=0)
    server, port = build_server(servicer, 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    sample = list(ShardDataset(dcl_shards).iter_samples("Med", "test"))[0]
    yield channel, sample, servicer
    channel.close()
    server.stop(None)
    servicer.close()


def _cases(sample, rng: random.Random, limits):
    """Endless ``(kind, payload bytes, metadata)``; every kind comes round in turn."""
    from cl_service.serve.proto import load

    pb2, _ = load()
    good_md = [("authorization", f"Bearer {TOKEN}")]
    images = {f: d for f in FORMATS if (d := _encoded(f, rng)) is not None}
    assert {"PNG", "JPEG", "GIF", "BMP", "TIFF"} <= set(images), images.keys()
    bombs = [_png_bomb(20000, 20000, rows=8), _png_bomb(30000, 30000), _png_bomb(4000, 4000), _gif_bomb()]
    valid = list(sample.images)

    def req(**kw):
        args = {"images": valid, "question": sample.question}
        args.update(kw)
        return pb2.PredictRequest(**args).SerializeToString()

    def questions():
        return rng.choice(["", " \n\t ", "x" * (limits.max_question_chars + rng.randint(1, 500)),
                           "\x00\x01\x02 what?", "\u202e\u2066 ¿qué? 🙃" * 20, "?" * limits.max_question_chars,
                           "<image>\n" * 50 + "which?"])

    kinds = [
        ("corrupt image", lambda: (req(images=[_mutate(rng.choice(list(images.values())), rng)]), good_md)),
        ("image of each format", lambda: (req(images=[rng.choice(list(images.values()))]), good_md)),
        ("decompression bomb", lambda: (req(images=[rng.choice(bombs)]), good_md)),
        ("mixed good and bad images", lambda: (req(images=valid + [_mutate(valid[0], rng)]), good_md)),
        ("too many images", lambda: (req(images=valid * rng.randint(limits.max_images + 1, 12)), good_md)),
        ("no or empty image", lambda: (req(images=rng.choice([[], [b""], [b""] * 3])), good_md)),
        ("odd question", lambda: (req(question=questions()), good_md)),
        ("max_new_tokens out of range", lambda: (req(max_new_tokens=rng.choice(
            [-2 ** 31, -1, 0, limits.max_new_tokens + 1, 2 ** 31 - 1])), good_md)),
        ("unknown expert", lambda: (req(expert=rng.choice(["", "nope", "../../etc/passwd", "RS ", "expert:",
                                                           "é" * 5000, "\x00"])), good_md)),
        ("missing or wrong token", lambda: (req(), rng.choice(
            [[], [("authorization", "Bearer wrong")], [("authorization", "Bearer")], [("authorization", "Basic x")],
             [("x-clsvc-token", "A" * 4000)], [("x-clsvc-token", TOKEN[:-1])]]))),
        ("invalid UTF-8 in a string field", lambda: (
            _field(1, valid[0]) + _field(rng.choice([2, 3]), b"caf\xc3" + rng.randbytes(4) + b"\xff\xfe"), good_md)),
        ("corrupt wire format", lambda: (_mutate(req(), rng), good_md)),
        ("random bytes", lambda: (rng.randbytes(rng.randint(0, 4096)), good_md)),
        ("wrong wire types", lambda: (_varint(1 << 3 | 0) + _varint(7) + _varint(2 << 3 | 5) + b"\0\0\0\0", good_md)),
        ("length beyond the message", lambda: (_varint(1 << 3 | 2) + _varint(2 ** 40) + b"\x89PNG", good_md)),
    ]
    while True:
        for kind, make in kinds:
            payload, md = make()
            yield kind, payload, md


def _call(raw, payload, md):
    try:
        return raw(payload, timeout=60, metadata=md), None
    except grpc.RpcError as e:
        return None, e


def test_fuzzed_predict_requests_never_fail_internally_and_the_server_keeps_answering(fuzz_server):
    from cl_service.serve.proto import load

    pb2, _ = load()
    channel, sample, servicer = fuzz_server
    raw = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    md = [("authorization", f"Bearer {TOKEN}")]
    valid = pb2.PredictRequest(images=list(sample.images), question=sample.question).SerializeToString()
    before = pb2.PredictResponse.FromString(raw(valid, timeout=60, metadata=md))
    rng = random.Random(23)
    seen: dict[str, set] = {}
    t0, n = time.monotonic(), 0
    for kind, payload, meta in _cases(sample, rng, servicer.limits):
        if n >= MAX_CASES or time.monotonic() - t0 > BUDGET_S:
            break
        n += 1
        out, err = _call(raw, payload, meta)
        if err is None:
            assert pb2.PredictResponse.FromString(out).expert in ("RS", "Med"), kind
            seen.setdefault(kind, set()).add("OK")
            continue
        details = err.details() or ""
        assert err.code() in ALLOWED, (kind, err.code(), details)
        assert "Traceback" not in details and 'File "' not in details and len(details) < 1000, (kind, details)
        seen.setdefault(kind, set()).add(err.code().name)
    print(f"fuzz: {n} cases in {time.monotonic() - t0:.1f} s", {k: sorted(v) for k, v in seen.items()})
    assert n >= MIN_CASES, f"only {n} fuzz cases in {BUDGET_S:.0f} s"
    assert len(seen) == 15, sorted(seen)  # every kind was sent
    assert seen["invalid UTF-8 in a string field"] == {"INVALID_ARGUMENT"}
    assert seen["decompression bomb"] <= {"INVALID_ARGUMENT", "OK"} and "INVALID_ARGUMENT" in seen["decompression bomb"]
    assert seen["unknown expert"] == {"NOT_FOUND"}  # a huge name is cut in the message, not echoed whole
    assert "UNAUTHENTICATED" in seen["missing or wrong token"] and "OK" not in seen["missing or wrong token"]
    # bad and valid requests at once: the valid ones share batches and are answered as before
    cases = _cases(sample, random.Random(5), servicer.limits)
    mixed = [next(cases)[1:] for _ in range(8)] + [(valid, md)] * 4
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda c: _call(raw, *c), mixed))
    assert all(err is None or err.code() in ALLOWED for _, err in results)
    assert all(pb2.PredictResponse.FromString(out).answer == before.answer for out, _ in results[8:])
    after = pb2.PredictResponse.FromString(raw(valid, timeout=60, metadata=md))
    assert (after.answer, after.expert) == (before.answer, before.expert)
