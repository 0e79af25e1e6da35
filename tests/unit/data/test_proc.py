"""The procedural ``proc-N`` streams: any length up to 100, prefixes of one another, routing needs the image."""

from __future__ import annotations

import pytest

from cl_service.data.synth import BENCHMARKS
from cl_service.data.synth.proc import MAX_TASKS, proc_stream

pytestmark = pytest.mark.timeout(60)


def test_registered_sizes_have_distinct_tasks_and_grow_by_appending():
    for n in (5, 10, 20, 50, 100):
        spec = BENCHMARKS.get(f"proc-{n}")
        assert len(spec.tasks) == n == len(set(spec.task_names)) and spec.iid
        assert spec.task_names == BENCHMARKS.get("proc-100").task_names[:n]
    names = BENCHMARKS.get("proc-100").task_names
    assert names[:6] == ["dots-slate", "bars-slate", "line-slate", "rings-slate", "stripes-slate", "dots-sand"]
    assert names[50] == "dots-slate-framed"
    with pytest.raises(ValueError, match="1..100"):
        proc_stream(MAX_TASKS + 1)


def test_a_task_generates_the_same_samples_in_every_stream_and_seed_matters():
    a = list(BENCHMARKS.get("proc-5").generate("test", 3, 0))
    b = list(BENCHMARKS.get("proc-50").generate("test", 3, 0))[:15]
    assert [(s.id, s.question, s.answers, s.images) for s in a] == [(s.id, s.question, s.answers, s.images) for s in b]
    c = list(BENCHMARKS.get("proc-5").generate("test", 3, 1))
    assert [s.images for s in a] != [s.images for s in c]
    train = list(BENCHMARKS.get("proc-5").generate("train", 3, 0))
    assert [s.images for s in train] != [s.images for s in a]


def test_tasks_of_one_kind_share_questions_and_differ_by_look():
    """dots-slate and dots-mint (looks 0 and 2) ask the very same questions: only the image tells them apart;
    dots-sand (look 1) words them otherwise. Answers and scorer are the exact-match kind."""
    every = list(BENCHMARKS.get("proc-20").generate("train", 4, 0))
    samples = {t: [s for s in every if s.task == t] for t in ("dots-slate", "dots-sand", "dots-mint")}
    q = {t: [s.question for s in v] for t, v in samples.items()}
    assert q["dots-slate"] == q["dots-mint"] != q["dots-sand"]
    assert all(s.scorer == "exact" and s.answers and s.images for v in samples.values() for s in v)
    assert samples["dots-slate"][0].images != samples["dots-mint"][0].images
    desc = {t.name: t.description for t in BENCHMARKS.get("proc-20").tasks}
    assert desc["dots-mint"].startswith("dots-mint: ") and "mint background" in desc["dots-mint"]
