"""The procedural benchmarks: deterministic, well-formed, balanced, visually distinct, and (ACL) shifted."""

from __future__ import annotations

import collections
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from cl_service.data.synth import BENCHMARKS
from cl_service.data.synth import generic as _generic  # noqa: F401  (registers generic-captions)
from cl_service.data.synth.render import GLYPHS, canvas, draw_text, text_mask, text_size
from cl_service.data.tasks import task_info

pytestmark = pytest.mark.timeout(120)

BENCHES = ["dcl-mini", "acl-mini", "generic-captions"]
ALL = [*BENCHES, "acl-glyphs"]  # acl-glyphs shares acl-mini's looks, so it stays out of the look tests
N = 48  # samples per task: a multiple of 2, 3 and 4, so every question type gets the same share
YES_NO = {"yes", "no"}
DIGITS = {str(i) for i in range(10)}
LETTERS = set("ABCD")


@pytest.fixture(scope="module")
def samples() -> dict[tuple[str, str, int], list]:
    """(benchmark, split, seed) -> samples; generated once for the module."""
    out = {}
    for b in ALL:
        for split, seed in [("train", 0), ("train", 1), ("test", 0)]:
            out[(b, split, seed)] = list(BENCHMARKS.get(b).generate(split, N, seed))
    return out


def _by_task(ss: list) -> dict[str, list]:
    d: dict[str, list] = collections.defaultdict(list)
    for s in ss:
        d[s.task].append(s)
    return d


def _decode(b: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(b))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def _hist(b: bytes) -> np.ndarray:
    """64-bin RGB colour histogram (4 levels per channel), normalised to sum 1."""
    q = _decode(b) // 64
    idx = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    return np.bincount(idx.ravel(), minlength=64) / idx.size


def _mean_hist(ss: list) -> np.ndarray:
    return np.mean([_hist(s.images[0]) for s in ss], axis=0)


def _format(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    if answer.isdigit():
        return "number"
    if re.fullmatch(r"[A-D](, [A-D])+", answer):
        return "letters"
    if re.fullmatch(r"[A-Z]", answer):
        return "letter"
    return "word"


# ---------------------------------------------------------------- registry and font
def test_benchmarks_registered_in_paper_order() -> None:
    dcl, acl, gen = (BENCHMARKS.get(b) for b in BENCHES)
    assert dcl.task_names == ["RS", "Med", "AD", "Sci", "Fin"] and dcl.iid
    assert acl.task_names == ["OCR", "Math", "VP", "GUI"] and not acl.iid
    assert gen.task_names == ["Generic"] and gen.tasks[0].scorer == "exact"
    for spec in (dcl, acl):
        for t in spec.tasks:
            assert (t.scorer, t.description) == (task_info(t.name).scorer, task_info(t.name).description)


def test_font_covers_answer_alphabet_and_sizes_match() -> None:
    for ch in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+-×=?":
        assert GLYPHS[ch].shape == (7, 5) and GLYPHS[ch].any()
    for kw in [{"sx": 2}, {"sx": 2, "sy": 3}, {"sx": 3, "bold": 1, "spacing": 2}]:
        w, h = text_size("AB12", **kw)
        assert text_mask("AB12", **kw).shape == (h, w)
    img = canvas(20, 20)
    draw_text(img, "1", 5, 3, (0, 0, 0), sx=2)  # glyphs are 14 px tall at the default scale
    rows = np.where((img == 0).all(-1).any(1))[0]
    assert (rows.min(), rows.max()) == (3, 16)
    with pytest.raises(ValueError, match="not in the built-in font"):
        text_mask("a~")


# ---------------------------------------------------------------- determinism and form
@pytest.mark.parametrize("bench", ALL)
def test_same_seed_same_bytes_other_seed_other_images(bench: str, samples: dict) -> None:
    spec = BENCHMARKS.get(bench)
    again = list(spec.generate("train", N, 0))
    first = samples[(bench, "train", 0)]
    assert [s.to_row() for s in again] == [s.to_row() for s in first]
    other = samples[(bench, "train", 1)]
    same = sum(a.images == b.images for a, b in zip(first, other))
    assert same == 0
    # splits draw from their own streams even when IID
    assert all(a.images != b.images for a, b in zip(first, samples[(bench, "test", 0)]))


def test_a_renamed_benchmark_keeps_its_random_streams() -> None:
    """acl-glyphs was acl-mini: with ``seed_key`` it still generates that stream's samples, byte for byte."""
    import dataclasses

    glyphs = BENCHMARKS.get("acl-glyphs")
    as_before = dataclasses.replace(glyphs, name="acl-mini", seed_key="")
    for split in ("train", "test"):
        assert [s.to_row() for s in glyphs.generate(split, 3, 0)] == [s.to_row() for s in as_before.generate(split, 3, 0)]
    assert [s.images for s in dataclasses.replace(glyphs, seed_key="").generate("train", 3, 0)] != [
        s.images for s in glyphs.generate("train", 3, 0)]


@pytest.mark.parametrize("bench", ALL)
def test_samples_well_formed(bench: str, samples: dict) -> None:
    scorers = {t.name: t.scorer for t in BENCHMARKS.get(bench).tasks}
    for (b, split, _), ss in samples.items():
        if b != bench:
            continue
        assert len({(s.task, s.id) for s in ss}) == len(ss)
        for s in ss:
            assert s.split == split and s.question and "<image>" not in s.question
            assert s.answers and all(isinstance(a, str) and a.strip() for a in s.answers)
            assert s.scorer == scorers[s.task]
            json.dumps(s.metadata)
            assert len(s.images) == 1
            img = _decode(s.images[0])
            assert img.shape == ((64, 96, 3) if s.task == "AD" else (64, 64, 3))


# ---------------------------------------------------------------- question types and answers
@pytest.mark.parametrize("bench", ALL)
def test_every_task_has_several_balanced_question_types(bench: str, samples: dict) -> None:
    for task, ss in _by_task(samples[(bench, "train", 0)]).items():
        types = collections.Counter(s.metadata["qtype"] for s in ss)
        assert len(types) >= 2, task
        assert max(types.values()) - min(types.values()) <= 1, (task, types)  # cycled, not drawn
        answers = collections.Counter(s.answer for s in ss)
        assert answers.most_common(1)[0][1] / len(ss) < 0.4, (task, answers.most_common(3))


def test_answers_are_not_predictable_from_the_question_text(samples: dict) -> None:
    """Where a question string recurs, its answers vary: the image carries the answer."""
    for bench in ALL:
        big = list(BENCHMARKS.get(bench).generate("train", 4 * N, 2))
        by_q: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        for s in big:
            by_q[(s.task, s.question)][s.answer] += 1
        for (task, q), c in by_q.items():
            n = sum(c.values())
            if n >= 12:
                assert c.most_common(1)[0][1] / n <= 0.75, (task, q, c)


def test_dcl_tasks_mix_formats_and_share_vocabulary(samples: dict) -> None:
    by_task = _by_task(samples[("dcl-mini", "train", 0)])
    vocab = {t: {s.answer for s in ss} for t, ss in by_task.items()}
    for t, ss in by_task.items():
        assert len({_format(s.answer) for s in ss}) >= 2, t  # a collapsed format is visible
    assert sum(bool(v & YES_NO) for v in vocab.values()) >= 4
    assert sum(bool(v & DIGITS) for v in vocab.values()) >= 4
    assert sum(bool(v & LETTERS) for v in vocab.values()) >= 2


def test_acl_and_generic_share_the_answer_formats(samples: dict) -> None:
    acl = {t: {s.answer for s in ss} for t, ss in _by_task(samples[("acl-mini", "train", 0)]).items()}
    for t in ("OCR", "Math", "VP"):
        assert acl[t] & DIGITS, t
    assert acl["Math"] & LETTERS and acl["GUI"] <= LETTERS and acl["VP"] & YES_NO
    gen = {s.answer for s in BENCHMARKS.get("generic-captions").generate("train", 400, 0)}
    assert YES_NO | DIGITS | LETTERS | {"red", "blue", "green", "left", "right"} <= gen


def test_scorer_specific_fields(samples: dict) -> None:
    dcl = _by_task(samples[("dcl-mini", "train", 0)])
    sources = collections.Counter(s.metadata["source"] for s in dcl["Sci"])
    assert sources["MapQA"] > 0 and len(sources) >= 3
    for s in dcl["Sci"]:
        if s.question.startswith("Which states"):
            assert s.metadata["source"] == "MapQA" and re.fullmatch(r"[A-D](, [A-D])*", s.answer)
        elif "A. " in s.question:
            assert s.answer in LETTERS
    for s in dcl["Fin"]:  # the Fin scorer strips spaces and '.' from predictions only
        assert re.fullmatch(r"yes|no|[A-D]|\d", s.answer)
    for bench, vp_types in [("acl-mini", {"simple", "complex", "compare", "size"}),
                            ("acl-glyphs", {"simple", "complex", "compare"})]:
        acl = _by_task(samples[(bench, "train", 0)])
        for s in acl["Math"] + acl["GUI"]:  # the math and gui scorers read option letters against metadata choices
            m = s.metadata
            qtype = m.get("question_type") or ("multi_choice" if "choices" in m else "letter")
            if qtype == "multi_choice":
                assert len(set(m["choices"])) == len(m["choices"]) >= 2, s.question
                assert s.answer in "ABCD"[: len(m["choices"])] and f"A. {m['choices'][0]}" in s.question
            elif qtype == "free_form":
                assert m["answer_type"] == "integer" and "choices" not in m and s.answer.isdigit()
            else:  # acl-glyphs' GUI: "Answer with the letter." of a labelled button
                assert s.task == "GUI" and s.answer in LETTERS
        assert {s.metadata["type"] for s in acl["VP"]} == vp_types
        assert all(s.answers == [s.answer, s.answer.lower()] for s in acl["OCR"] if s.metadata["answer_type"] == "word")


# ---------------------------------------------------------------- looks
def test_images_show_the_answer(samples: dict) -> None:
    """Spot checks that the rendered cue agrees with the answer."""
    dcl = _by_task(samples[("dcl-mini", "train", 0)])
    for s in dcl["RS"]:
        if s.metadata["qtype"] == "water":
            a = _decode(s.images[0]).astype(int)
            blue = (a[..., 2] > a[..., 0] + 60) & (a[..., 2] > a[..., 1] + 40)
            assert (blue.mean() > 0.02) == (s.answer == "yes")
    for s in dcl["AD"]:
        if s.metadata["qtype"] == "red_light":
            a = _decode(s.images[0]).astype(int)
            lamp = (a[..., 0] > 230) & (a[..., 1] < 60) & (a[..., 2] < 60)
            assert lamp.any() == (s.answer == "yes")
    for s in BENCHMARKS.get("generic-captions").generate("train", 160, 0):
        if s.metadata["qtype"] == "count" and s.answer == "0":
            assert len(np.unique(_decode(s.images[0]).reshape(-1, 3), axis=0)) == 1


def test_tasks_look_distinct(samples: dict) -> None:
    """Each task's mean colour histogram on a fresh seed is nearest to its own (all 10 tasks)."""
    ref, new = {}, {}
    for b in BENCHES:
        ref.update({t: _mean_hist(ss) for t, ss in _by_task(samples[(b, "train", 0)]).items()})
        new.update({t: _mean_hist(ss) for t, ss in _by_task(samples[(b, "train", 1)]).items()})
    tasks = list(ref)
    for t in tasks:
        dist = {u: float(np.abs(new[t] - ref[u]).sum()) for u in tasks}
        assert min(dist, key=dist.get) == t, (t, dist)
        assert sorted(dist.values())[1] > 1.5 * dist[t], (t, dist)


def _mean_image(ss: list) -> np.ndarray:
    return np.mean([_decode(s.images[0]).astype(np.float32) / 255 for s in ss], axis=0)


@pytest.mark.parametrize("bench", ["acl-mini", "acl-glyphs"])
@pytest.mark.parametrize("task", ["OCR", "Math", "VP", "GUI"])
def test_acl_test_split_is_shifted(bench: str, task: str, samples: dict) -> None:
    """Train and test differ far more than two independent train draws do: in their colours (mean colour
    histogram) or in their layout (mean image: sizes, frames, where things are)."""
    train0, train1, test = (_by_task(samples[(bench, split, seed)])[task]
                            for split, seed in [("train", 0), ("train", 1), ("test", 0)])
    h0, h1, ht = (_mean_hist(ss) for ss in (train0, train1, test))
    m0, m1, mt = (_mean_image(ss) for ss in (train0, train1, test))
    colours = np.abs(h0 - ht).sum() > 2 * max(np.abs(h0 - h1).sum(), 0.2)
    layout = np.abs(m0 - mt).mean() > 2 * np.abs(m0 - m1).mean()
    assert colours or layout


def test_dcl_test_split_is_not_shifted(samples: dict) -> None:
    for task, ss in _by_task(samples[("dcl-mini", "test", 0)]).items():
        train0 = _mean_hist(_by_task(samples[("dcl-mini", "train", 0)])[task])
        assert np.abs(train0 - _mean_hist(ss)).sum() < 0.5, task
