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
