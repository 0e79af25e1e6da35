"""Fuzzing ingest on a tiny release layout, bounded in cases and time: malformed records, files and images.

Every bad input is an :class:`IngestError` naming file and record (or, with ``skip_bad``, a skipped and counted
record); never an exception of another type, and the good record next to it is still ingested.
"""

from __future__ import annotations

import io
import json
import random
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from cl_service.data.ingest import IngestError, ingest
from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(120)

BUDGET_S = 20.0
MAX_CASES = 1000
MIN_CASES = 40
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


def _encoded(fmt: str, rng: random.Random) -> bytes | None:
    im = Image.frombytes("RGB", (20, 20), bytes(rng.randrange(256) for _ in range(20 * 20 * 3)))
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (KeyError, OSError, ValueError):
        return None
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:
        return bytes(b[: rng.randrange(max(1, len(b)))])
    if op == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 2:
        at = rng.randrange(len(b) + 1)
        return bytes(b[:at]) + rng.randbytes(rng.randint(1, 64)) + bytes(b[at:])
    if op == 3:
        return bytes(b[: rng.randint(1, 40)])
    return rng.randbytes(rng.randint(0, 512))


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\0" + b"\0" * ((w + 7) // 8)) * 4
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GOOD_TRAIN = {"id": "good", "image": "good.png",
              "conversations": [{"from": "human", "value": "<image>\nIs it blue?"}, {"from": "gpt", "value": "yes"}]}
GOOD_TEST = {"question_id": "good", "image": "good.png", "text": "Is it blue?", "answer": "yes"}


def _odd_values(rng: random.Random) -> list:
    return [None, 0, -1, 2 ** 70, 1.5, float("nan"), True, "", " ", "\x00", "x" * rng.randint(10_000, 200_000),
            "\ud800 lone surrogate", [], [[]], {}, {"a": [1, {"b": None}]}, ["a", 1, None], "é" * 300]


def _bad_records(rng: random.Random, image_names: list[str]):
    """Endless ``(kind, split, record)``: one mutation of a good record each, every kind in turn."""
    odd = _odd_values(rng)
    paths = image_names + ["", "/etc/passwd", "../good.png", "missing.png", "a\x00b.png", "n" * 5000 + ".png",
                           "sub", ".", "images", "good.png/", "~/good.png"]

    def mutated(good, changes):  # a deep copy of a good record; a value of ... drops the key
        rec = json.loads(json.dumps(good))
        for k, v in changes.items():
            if v is ...:
                rec.pop(k, None)
            else:
                rec[k] = v
        return rec

    def train(**changes):
        return mutated(GOOD_TRAIN, changes)

    def test(**changes):
        return mutated(GOOD_TEST, changes)

    def conv():
        turn = {"from": rng.choice(["human", "gpt", "system", None, 1]), "value": rng.choice(odd + ["q", "a"])}
        return rng.choice([odd, [turn], [turn, turn, turn], [GOOD_TRAIN["conversations"][0], turn],
                           [GOOD_TRAIN["conversations"][0], {"from": "gpt"}], "not a list"])

    kinds = [
        ("record not an object", lambda: (rng.choice(["train", "test"]), rng.choice(odd))),
        ("train: odd id", lambda: ("train", train(id=rng.choice(odd + [...])))),
        ("train: odd image", lambda: ("train", train(image=rng.choice(paths + odd + [...])))),
        ("train: image list", lambda: ("train", train(image=rng.sample(paths, rng.randint(0, 3))))),
        ("train: odd conversations", lambda: ("train", train(conversations=conv()))),
        ("train: odd answers", lambda: ("train", train(answers=rng.choice(odd)))),
        ("train: odd extra field", lambda: ("train", train(meta=rng.choice(odd)))),
        ("test: missing field", lambda: ("test", test(**{rng.choice(["question_id", "text", "answer"]): ...}))),
        ("test: odd text", lambda: ("test", test(text=rng.choice(odd)))),
        ("test: odd answer", lambda: ("test", test(answer=rng.choice(odd)))),
        ("test: odd question_id", lambda: ("test", test(question_id=rng.choice(odd)))),
        ("test: odd image", lambda: ("test", test(image=rng.choice(paths + odd)))),
    ]
    while True:
        for kind, make in kinds:
            split, rec = make()
            yield kind, split, rec


def _bad_files(rng: random.Random):
    """Whole files that are not a list of records."""
    return [b"", b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000, b'{"a": 1}', b"[1, 2", b"\xef\xbb\xbf[]",
            b'[{"id": "x", "image": "good.png", "conversations": NaN}]', rng.randbytes(300), b"null",
            ("[" + json.dumps(GOOD_TEST) + "," + '"\\ud800"' + "]").encode()]


def _ingest(root: Path, out: Path, skip_bad: bool):
    """(manifest or None, IngestError or None); any other exception fails the test."""
    try:
        return ingest(root, ["RS"], out, skip_bad=skip_bad), None
    except IngestError as e:
        assert "Traceback" not in str(e)
        return None, e


def test_fuzzed_records_and_images_are_clear_errors_or_skipped(tmp_path):
    rng = random.Random(23)
    root = tmp_path / "release"
    images = root / "RS" / "images"
    images.mkdir(parents=True)
    (images / "sub").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(images / "good.png")
    names = []
    for fmt in FORMATS:
        data = _encoded(fmt, rng)
        if data is None:
            continue
        (images / f"ok.{fmt.lower()}").write_bytes(data)
        names.append(f"ok.{fmt.lower()}")
        for k in range(3):
            (images / f"bad{k}.{fmt.lower()}").write_bytes(_mutate(data, rng))
            names.append(f"bad{k}.{fmt.lower()}")
    assert {"ok.png", "ok.jpeg", "ok.gif", "ok.bmp", "ok.tiff"} <= set(names)
    (images / "bomb.png").write_bytes(_png_bomb(30000, 30000))
    names.append("bomb.png")

    def write(split: str, payload: bytes | list) -> None:
        other = "test" if split == "train" else "train"
        (root / "RS" / f"{other}.json").write_text(json.dumps([GOOD_TRAIN if other == "train" else GOOD_TEST]))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        (root / "RS" / f"{split}.json").write_bytes(data)

    t0, n, errors, skipped = time.monotonic(), 0, 0, 0
    kinds: set[str] = set()
    cases = ((f"file {i}", rng.choice(["train", "test"]), data) for i, data in enumerate(_bad_files(rng)))
    records = _bad_records(rng, names)
    while n < MAX_CASES and time.monotonic() - t0 < BUDGET_S:
        kind, split, bad = next(cases, None) or next(records)
        good = GOOD_TRAIN if split == "train" else GOOD_TEST
        write(split, bad if kind.startswith("file") else [good, bad])
        n += 1
        kinds.add(kind.split(" ")[0] if kind.startswith("file") else kind)
        strict, err = _ingest(root, tmp_path / f"strict{n}", skip_bad=False)
        if err is not None:
            errors += 1
            assert not (tmp_path / f"strict{n}").exists()  # nothing half-written is left
            if kind.startswith("file"):
                continue  # a file that is not a list of records is an error with --skip-bad too
            assert f"{split}.json record 1" in str(err) and "--skip-bad" in str(err), (kind, str(err)[:300])
        manifest, err = _ingest(root, tmp_path / f"skip{n}", skip_bad=True)
        if kind.startswith("file"):
            continue
        assert err is None, (kind, str(err)[:300])
        counts = manifest["counts"]["RS"]
        assert counts["train"] >= 1 and counts["test"] >= 1  # the good records are always ingested
        if strict is None:
            skipped += 1
            assert manifest["skipped"]["RS"][split] == 1, kind
            got = ShardDataset(tmp_path / f"skip{n}").samples("RS", split)
            assert [s.id for s in got] == ["good"], kind
    print(f"ingest fuzz: {n} cases in {time.monotonic() - t0:.1f} s, {errors} errors, {skipped} skipped")
    assert n >= MIN_CASES, f"only {n} fuzz cases in {BUDGET_S:.0f} s"
    assert len(kinds) == 13 and errors > n // 2 and skipped > n // 3, (sorted(kinds), n, errors, skipped)
