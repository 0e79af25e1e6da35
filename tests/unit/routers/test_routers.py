import numpy as np
import pytest

from cl_service.data.schema import Sample
from cl_service.routers.prompt import Pool, parse_choice, router_prompt, router_sample
from cl_service.routers.prototype import PrototypeRouter

pytestmark = pytest.mark.timeout(30)

POOL = Pool(("RS", "Med", "AD"), ("remote sensing: aerial", "medicine: slides", "driving: cameras"))


def test_prompt_has_the_papers_structure():
    p = router_prompt(POOL, "Is there water?")
    lines = p.splitlines()
    assert "router" in lines[0] and "3 experts" in lines[0] and "remote sensing" in lines[0]
    assert "only with the expert's letter" in lines[1] and "do not answer" in lines[1]
    assert lines[2:5] == ["A. remote sensing: aerial", "B. medicine: slides", "C. driving: cameras"]
    assert lines[5] == "Question: Is there water?" and "letter" in lines[6]


def test_router_sample_targets_the_letter_in_pool_order():
    s = Sample("Med", "train", "1", [b"x"], "q?", ["yes"], "med")
    r = router_sample(POOL, s, "Med")
    assert r.answers == ["B"] and r.images == [b"x"] and r.question.endswith("is:")


@pytest.mark.parametrize("raw, expert", [("B", "Med"), (" C.", "AD"), ("The answer is A", "RS"), ("Bexpert", "Med"),
                                         ("D then A", "RS"), ("", None), ("yes", None), ("Z", None), ("d", None)])
def test_parse_takes_the_first_valid_letter(raw, expert):
    assert parse_choice(raw, POOL) == expert


EXPECTED_3 = """\
You are a router choosing among 3 experts (remote sensing, medicine, driving).
Pick the expert best suited to the image and question below. Answer only with the expert's letter; do not answer the question.
A. remote sensing: aerial
B. medicine: slides
C. driving: cameras
Question: Is there water?
The letter of the most suitable expert is:"""


def test_prompt_up_to_26_experts_is_the_papers_byte_for_byte():
    """Taken from the code before pools past 26 experts: small pools' prompts (router training data, job keys,
    the demo's metrics) must not move."""
    assert router_prompt(POOL, "Is there water?") == EXPECTED_3
    p26 = _pool(26)
    assert p26.label_len == 1 and p26.letters == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert router_prompt(p26, "q").splitlines()[-2:] == ["Question: q", "The letter of the most suitable expert is:"]


def _pool(n):
    return Pool(tuple(f"e{i}" for i in range(n)), tuple(f"domain {i}: things {i}" for i in range(n)))


@pytest.mark.parametrize("n", [27, 30, 100, 676])
def test_pools_past_26_experts_take_two_letter_labels(n):
    pool = _pool(n)
    assert pool.label_len == 2 and len(set(pool.letters)) == n
    assert pool.letters[:3] == ("AA", "AB", "AC") and pool.letters[26] == "BA"
    lines = router_prompt(pool, "Is there water?").splitlines()
    assert f"{n} experts" in lines[0] and "2-letter code" in lines[1] and "do not answer" in lines[1]
    assert lines[2:2 + n] == [f"{L}. domain {i}: things {i}" for i, L in enumerate(pool.letters)]
    assert lines[2 + n:] == ["Question: Is there water?", "The 2-letter code of the most suitable expert is:"]
    s = Sample("e1", "train", "1", [b"x"], "q?", ["yes"], "e1")
    assert router_sample(pool, s, f"e{n - 1}").answers == [pool.letters[-1]]
    for i, label in enumerate(pool.letters):  # every label round-trips, bare or wrapped in text
        for raw in (label, f" {label}.", f"{label} is the answer", f"The answer is {label}", f"{label}expert",
                    f"zz {label}, then {pool.letters[0]}"):
            assert parse_choice(raw, pool) == f"e{i}", raw


def test_pools_past_676_experts_take_three_letters():
    pool = _pool(677)
    assert pool.label_len == 3 and pool.letters[0] == "AAA" and pool.letters[-1] == "BAA"
    assert parse_choice("BAA.", pool) == "e676" and parse_choice("BA", pool) is None


@pytest.mark.parametrize("raw, expert", [("AB.", "e1"), ("AB is the answer", "e1"), ("A B", None), ("A", None),
                                         ("B", None), ("ab", None), ("ABC", "e1"), ("ABC AC", "e2"),
                                         ("ZZ", None), ("BE", None), ("BD", "e29"), ("Z AC", "e2"), ("", None),
                                         ("AB\nAC", "e1")])
def test_parse_two_letter_labels(raw, expert):
    """A 30-expert pool labels AA .. BD: the first standalone label wins; a label glued to text at the start
    counts ("ABC" -> AB, as "Bexpert" -> B); letters split by spaces never join into a label."""
    assert parse_choice(raw, _pool(30)) == expert


class _FakeFeatures:
    """Features = the sample's first image byte as a one-hot: a stand-in for pooled base features."""

    def features(self, samples):
        out = np.zeros((len(samples), 4))
        for i, s in enumerate(samples):
            out[i, s.images[0][0]] = 1.0
        return out


def test_prototype_router_nearest_mean():
    mk = lambda t, b: Sample(t, "train", "1", [bytes([b])], "q", ["a"], "exact")  # noqa: E731
    r = PrototypeRouter.fit(_FakeFeatures(), {"RS": [mk("RS", 0), mk("RS", 0)], "Med": [mk("Med", 2)]})
    routes = r.route([mk("?", 2), mk("?", 0)])
    assert [x.expert for x in routes] == ["Med", "RS"] and not any(x.fallback for x in routes)


class _GaussFeatures:
    """question_features = a fixed random vector per task plus noise (keyed by the sample's first byte)."""

    def __init__(self, dim=16, noise=0.3):
        rng = np.random.default_rng(0)
        self.centres = rng.normal(size=(4, dim))
        self.noise = noise
        self.rng = np.random.default_rng(1)

    def question_features(self, samples):
        return np.stack([self.centres[s.images[0][0]] + self.noise * self.rng.normal(size=self.centres.shape[1])
                         for s in samples])

    features = question_features


def _mk(task, b, n):
    return [Sample(task, "train", f"{task}{i}", [bytes([b])], "q", ["a"], "exact") for i in range(n)]


def test_ridge_router_separates_tasks_and_round_trips(tmp_path):
    from cl_service.routers.ridge import RidgeRouter
    from cl_service.routers.store import RouterFileError, load_router, save_router

    eng = _GaussFeatures()
    r = RidgeRouter.fit(eng, {"RS": _mk("RS", 0, 10), "Med": _mk("Med", 1, 10), "AD": _mk("AD", 2, 10)})
    test = _mk("?", 0, 5) + _mk("?", 1, 5) + _mk("?", 2, 5)
    assert [x.expert for x in r.route(test)] == ["RS"] * 5 + ["Med"] * 5 + ["AD"] * 5
    assert r.route([]) == []
    save_router(r, tmp_path / "ridge", {"samples_per_task": 10})
    back = load_router(tmp_path / "ridge", eng)
    assert back.kind == "ridge" and back.experts == ("RS", "Med", "AD")
    feats_in = _mk("?", 1, 3)
    eng.rng = np.random.default_rng(5)
    a = r.scores(feats_in)
    eng.rng = np.random.default_rng(5)
    np.testing.assert_array_equal(a, back.scores(feats_in))
    (tmp_path / "ridge" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(RouterFileError, match="checksum"):
        load_router(tmp_path / "ridge", eng)
    with pytest.raises(RouterFileError, match="not a saved router"):
        load_router(tmp_path / "missing", eng)


def test_prototype_router_round_trips(tmp_path):
    from cl_service.routers.store import load_router, save_router

    mk = lambda t, b: Sample(t, "train", "1", [bytes([b])], "q", ["a"], "exact")  # noqa: E731
    r = PrototypeRouter.fit(_FakeFeatures(), {"RS": [mk("RS", 0)], "Med": [mk("Med", 2)]})
    back = load_router(save_router(r, tmp_path / "p"), _FakeFeatures())
    assert back.kind == "prototype" and [x.expert for x in back.route([mk("?", 2)])] == ["Med"]


@pytest.mark.timeout(180)
def test_question_features_of_the_real_model(tiny_base, dcl_shards):
    """Routing features from a real (tiny) MLLM: [B, H_text + H_vision], deterministic, batch-invariant."""
    import torch

    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine

    torch.set_num_threads(1)
    ds = ShardDataset(dcl_shards)
    samples = ds.samples("RS", "train")[:3] + ds.samples("AD", "train")[:2]
    eng = Engine(tiny_base)
    f = eng.question_features(samples)
    cfg = eng.mllm.cfg
    assert f.shape == (5, cfg.text_hidden + cfg.vision_hidden) and np.isfinite(f).all()
    eng.batch_size = 2
    np.testing.assert_allclose(f, eng.question_features(samples), atol=1e-4)


class _TemplateFeatures:
    """routing_features = [question half | image half] keyed by the sample's first two image bytes: byte 0
    picks a question template, byte 1 an image look. A task may use several templates."""

    text_dim = 4

    def routing_features(self, samples):
        out = np.zeros((len(samples), 8))
        for i, s in enumerate(samples):
            out[i, s.images[0][0]] = 1.0
            out[i, 4 + s.images[0][1]] = 1.0
        return out + 0.01


def _tpl(task, template, look, n=3):
    return [Sample(task, "train", f"{task}{template}{i}", [bytes([template, look])], "q", ["a"], "exact") for i in range(n)]


def test_knn_router_routes_by_the_nearest_key_and_round_trips(tmp_path):
    """OCR asks two question templates (0, 1), VP a third (2); every test item carries the other task's
    look, and the question half still sends each to its task. Keys are unit length per half."""
    from cl_service.routers.nearest import NearestRouter
    from cl_service.routers.store import load_router, save_router

    eng = _TemplateFeatures()
    per_task = {"OCR": _tpl("OCR", 0, 0) + _tpl("OCR", 1, 0), "VP": _tpl("VP", 2, 1)}
    r = NearestRouter.fit(eng, per_task)
    test = _tpl("?", 0, 1, 1) + _tpl("?", 1, 1, 1) + _tpl("?", 2, 0, 1)  # each with the other task's look
    assert [x.expert for x in r.route(test)] == ["OCR", "OCR", "VP"] and r.route([]) == []
    assert r.keys.shape == (9, 8) and np.allclose(np.linalg.norm(r.keys[:, :4], axis=1), 1, atol=1e-5)
    back = load_router(save_router(r, tmp_path / "knn"), eng)
    assert back.kind == "knn" and back.experts == ("OCR", "VP")
    np.testing.assert_array_equal(r.scores(test), back.scores(test))
    with pytest.raises(ValueError, match="at least one sample"):
        NearestRouter.fit(eng, {"OCR": [], "VP": _tpl("VP", 2, 1)})


@pytest.mark.timeout(180)
def test_routing_features_of_the_real_model_see_the_question_alone(tiny_base, dcl_shards):
    """[B, H_text + H_vision], batch-invariant; the question half does not change with the image, the image
    half is question_features' image half."""
    import dataclasses

    import torch

    from cl_service.data.shards import ShardDataset
    from cl_service.engine import Engine

    torch.set_num_threads(1)
    ds = ShardDataset(dcl_shards)
    samples = ds.samples("RS", "train")[:3] + ds.samples("AD", "train")[:2]
    eng = Engine(tiny_base)
    f = eng.routing_features(samples)
    d = eng.text_dim
    assert f.shape == (5, d + eng.mllm.cfg.vision_hidden) and np.isfinite(f).all()
    np.testing.assert_allclose(f[:, d:], eng.question_features(samples)[:, d:], atol=1e-5)
    other = [dataclasses.replace(s, id=s.id + "-x", images=samples[-1].images) for s in samples]
    np.testing.assert_allclose(eng.routing_features(other)[:, :d], f[:, :d], atol=1e-4)
    eng.batch_size = 2
    eng.memo = None
    np.testing.assert_allclose(f, eng.routing_features(samples), atol=1e-4)
    # a server's stage one: the CLIP states it already computed, one short text-only pass (batch of 5 > 2)
    np.testing.assert_allclose(f, eng.routing_features(samples, eng.vision_states(samples)), atol=1e-4)
    from cl_service.routers.base import over_states
    from cl_service.routers.nearest import NearestRouter

    knn = NearestRouter.fit(eng, {"RS": samples[:3], "AD": samples[3:]})
    shared = over_states(knn, eng, eng.vision_states(samples))
    assert shared.engine is not eng and [r.expert for r in shared.route(samples)] == [r.expert for r in knn.route(samples)]
