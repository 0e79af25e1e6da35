"""Look-jittered copies for router training: deterministic, same size, visibly another look, same content."""

import io

import numpy as np
import pytest
from PIL import Image

from cl_service.data.augment import with_jittered_copies, with_swapped_images
from cl_service.data.images import decode_image
from cl_service.data.schema import Sample
from cl_service.data.synth import BENCHMARKS


@pytest.fixture(scope="module")
def samples():
    return list(BENCHMARKS.get("acl-mini").generate("train", 2, 0))


def test_copies_follow_the_originals_with_new_ids_and_the_same_question(samples):
    out = with_jittered_copies(samples, 2, seed=7)
    assert len(out) == 3 * len(samples)
    assert out[:len(samples)] == samples
    for k in (1, 2):
        for s, c in zip(samples, out[k * len(samples):(k + 1) * len(samples)]):
            assert c.id == f"{s.id}~aug{k}"
            assert (c.task, c.question, c.answers, c.scorer) == (s.task, s.question, s.answers, s.scorer)
            a, b = (np.asarray(decode_image(x), dtype=np.int16) for x in (s.images[0], c.images[0]))
            assert a.shape == b.shape
            assert np.abs(a - b).mean() > 5  # another look, not a copy


def test_copies_are_deterministic_per_seed(samples):
    a = with_jittered_copies(samples, 1, seed=7)[len(samples):]
    b = with_jittered_copies(samples, 1, seed=7)[len(samples):]
    c = with_jittered_copies(samples, 1, seed=8)[len(samples):]
    assert [s.images for s in a] == [s.images for s in b]
    assert [s.images for s in a] != [s.images for s in c]


def test_zero_copies_is_identity_and_negative_is_an_error(samples):
    assert with_jittered_copies(samples, 0) == list(samples)
    with pytest.raises(ValueError, match="copies"):
        with_jittered_copies(samples, -1)


def test_non_square_images_keep_their_size():
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, format="PNG")
    s = Sample("AD", "train", "x", [buf.getvalue()], "q?", ["a"], "exact")
    for c in with_jittered_copies([s], 4, seed=0)[1:]:
        assert decode_image(c.images[0]).size == (96, 64)


def test_router_job_parts_carry_their_jittered_copies(tmp_path, samples):
    from cl_service.adapters.lora import LoraCfg
    from cl_service.data.shards import ShardWriter
    from cl_service.routers.prompt import Pool
    from cl_service.train.job import DataPart, TrainJob, load_parts
    from cl_service.train.loop import TrainCfg

    tasks = sorted({s.task for s in samples})
    with ShardWriter(tmp_path / "ds", [{"name": t, "scorer": "exact", "description": t} for t in tasks]) as w:
        w.add_all(samples)
    pool = Pool(tuple(tasks), tuple(tasks))

    def job(augment, swap=0):
        parts = tuple(DataPart(t, limit=1, seed=3, router_expert=t, augment=augment, swap_images=swap) for t in tasks)
        return TrainJob(name="router", kind="router", task="*", out_dir=str(tmp_path / "r"), base_path="/b",
                        dataset=str(tmp_path / "ds"), parts=parts, lora=LoraCfg(rank=2), train=TrainCfg(max_steps=1),
                        router_pool=pool)

    plain, aug = load_parts(job(0)), load_parts(job(2))
    assert len(plain) == len(tasks) and len(aug) == 3 * len(tasks)
    assert {s.answers[0] for s in aug} == set(pool.letters)  # copies keep their router target letter
    assert sum(s.id.endswith("~aug2") for s in aug) == len(tasks)
    assert aug == load_parts(job(2))  # deterministic: the same job trains on the same images
    # the feature routers fit on the same samples as the MLLM router's job part (choose_with_copies)
    from cl_service.data.shards import ShardDataset
    from cl_service.train.job import choose_with_copies

    fit = [s for t in tasks for s in choose_with_copies(ShardDataset(tmp_path / "ds"), t, "train", 1, 3, 2)]
    assert sorted(s.id for s in fit) == sorted(s.id for s in aug)
    assert {s.id: s.images for s in fit} == {s.id: s.images for s in aug}

    # swapped copies: another task's image under this task's question and router letter
    swapped = load_parts(job(0, swap=1))
    assert len(swapped) == 2 * len(tasks)
    own_image = {s.id: s.images for s in plain}
    for s in swapped:
        if "~swap1" in s.id:
            original = s.id.removesuffix("~swap1")
            assert s.images != own_image[original]
            assert s.question == next(p for p in plain if p.id == original).question
    assert job(0).key() != job(0, swap=1).key() and job(0).key() == job(0, swap=0).key()


def test_swapped_copies_take_an_image_of_another_task(samples):
    out = with_swapped_images(samples, samples, 2, seed=5)
    assert len(out) == 2 * len(samples)
    by_image = {s.images[0]: s.task for s in samples}
    for s in out:
        assert "~swap" in s.id and by_image[s.images[0]] != s.task
    assert out == with_swapped_images(samples, samples, 2, seed=5)  # deterministic
    one_task = [s for s in samples if s.task == samples[0].task]
    assert with_swapped_images(one_task, one_task, 1) == []  # no donor of another task: no copies
    with pytest.raises(ValueError, match="copies"):
        with_swapped_images(samples, samples, -1)
