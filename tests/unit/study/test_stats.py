"""The study's interval and test code against scipy on fixed numbers."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from cl_service.study.stats import (bootstrap_interval, interval, item_bootstrap, percentile_interval, point,
                                    sign_flip_test, t_interval, t_quantile)

CELLS = [44.0, 44.3, 41.7, 47.2, 39.9, 45.5]


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 120])
@pytest.mark.parametrize("p", [0.5, 0.8, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_t_interval_matches_scipy(n):
    x = np.array(CELLS[:n])
    iv = t_interval(x)
    lo, hi = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=sps.sem(x))
    assert (iv.mean, iv.low, iv.high, iv.n) == (pytest.approx(x.mean()), pytest.approx(lo), pytest.approx(hi), n)
    assert iv.method.startswith(f"t interval over {n} cells")


def test_percentile_bootstrap_of_a_mean_matches_scipy():
    rng = np.random.default_rng(3)
    items = (rng.random(60) < 0.45).astype(float) * 100  # one task, one cell: 60 right/wrong items
    iv = bootstrap_interval([[items[None, :]]], resamples=20000, seed=1)
    ref = sps.bootstrap((items,), np.mean, confidence_level=0.95, n_resamples=20000, method="percentile",
                        random_state=1).confidence_interval
    assert iv.mean == pytest.approx(items.mean())
    # two Monte Carlo estimates of the same quantiles: the standard error at 20,000 resamples is ~0.15 points
    assert iv.low == pytest.approx(ref.low, abs=0.8) and iv.high == pytest.approx(ref.high, abs=0.8)
    assert iv.high - iv.low == pytest.approx(ref.high - ref.low, abs=1.0)


def test_bootstrap_draws_each_item_set_once_for_every_cell_and_sums_tasks():
    # two cells on the same items: resampled together, the replicate of the mean of two identical cells is the
    # replicate of one of them; tasks add up
    a = np.array([[0.0, 10.0, 20.0, 30.0]])
    b = np.array([[5.0, 5.0, 15.0]])
    twin = [[np.vstack([a, a])], [np.vstack([b, b])]]
    one = [[a], [b]]
    assert point(twin) == pytest.approx(15.0 + 25.0 / 3)
    assert np.allclose(item_bootstrap(twin, 500, seed=4), item_bootstrap(one, 500, seed=4))
    with pytest.raises(ValueError, match="same cells"):
        point([[a], [np.vstack([b, b])]])


def test_percentile_interval_is_numpys_linear_percentile():
    reps = np.arange(1001, dtype=float)
    assert percentile_interval(reps) == (pytest.approx(25.0), pytest.approx(975.0))


def test_the_rule_t_interval_from_three_cells_else_bootstrap():
    blocks = [[np.array([[100.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 100.0]])]]
    assert interval([50.0, 75.0, 60.0], blocks).method.startswith("t interval over 3 cells")
    two = interval([75.0, 50.0], blocks)
    assert two.method.startswith("percentile bootstrap over test items") and two.mean == pytest.approx(62.5)
    assert 0.0 <= two.low <= two.mean <= two.high <= 100.0


def test_sign_flip_test_against_exact_enumeration_and_scipy():
    d = np.array([3.0, -1.0, 2.5, 4.0, 0.0, 1.5, -0.5, 2.0, 3.5, 1.0])
    nz = d[d != 0]
    sums = [abs(sum(s * x for s, x in zip(signs, nz))) for signs in itertools.product((1, -1), repeat=len(nz))]
    exact = np.mean(np.array(sums) >= abs(nz.sum()) - 1e-12)
    p = sign_flip_test(d, permutations=40000, seed=2)
    assert p == pytest.approx(exact, abs=0.006)  # Monte Carlo (standard error ~0.001)
    ref = sps.permutation_test((d,), lambda x: np.sum(x), permutation_type="samples", alternative="two-sided",
                               n_resamples=np.inf).pvalue
    assert exact == pytest.approx(ref, rel=1e-9)
    assert sign_flip_test(np.zeros(5)) == 1.0
    assert sign_flip_test(np.full(12, 1.0), permutations=2000) < 0.01  # all one way: about 2/4096 exactly
