"""CL metrics on hand-computed matrices, the BWT identity, validation, and router accuracy."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from cl_service.eval.metrics import CLMetrics, compute_cl_metrics, router_accuracy, router_accuracy_per_task

pytestmark = pytest.mark.timeout(60)

# a[i][j]: accuracy on task j after training task i
A = [[80.0, 10.0, 5.0],
     [70.0, 60.0, 20.0],
     [65.0, 50.0, 90.0]]


def test_hand_computed_3x3():
    m = compute_cl_metrics(A)
    assert m.num_tasks == 3
    assert m.mft == pytest.approx((65 + 50 + 90) / 3)          # 68.33
    assert m.mfn == pytest.approx((80 + 60 + 90) / 3)          # 76.67
    assert m.maa == pytest.approx((80 + (70 + 60) / 2 + (65 + 50 + 90) / 3) / 3)   # 71.11
    assert m.bwt == pytest.approx(((65 - 80) + (50 - 60)) / 2)  # -12.5
    assert m.forgetting == pytest.approx((15.0, 10.0))
    assert m.mean_forgetting == pytest.approx(12.5)


def test_forgetting_uses_the_best_earlier_stage_while_bwt_uses_the_diagonal():
    a = [row[:] for row in A]
    a[1][0] = 85.0  # task 0 improved after task 1, then dropped
    m = compute_cl_metrics(a)
    assert m.forgetting == pytest.approx((20.0, 10.0))   # max(80, 85) - 65
    assert m.bwt == pytest.approx(-12.5)                  # unchanged: (65-80 + 50-60) / 2
    assert m.maa == pytest.approx((80 + (85 + 60) / 2 + 205 / 3) / 3)


def test_entries_above_the_diagonal_are_ignored_and_may_be_none_or_nan():
    ref = compute_cl_metrics(A)
    for filler in (None, math.nan, 0.0, 100.0):
        a = [[A[i][j] if j <= i else filler for j in range(3)] for i in range(3)]
        assert compute_cl_metrics(a) == ref


def test_bwt_identity_on_random_matrices():
    rng = random.Random(7)
    for t in (2, 3, 5, 9):
        a = [[rng.uniform(0, 100) for _ in range(t)] for _ in range(t)]
        m = compute_cl_metrics(a)
        assert m.bwt == pytest.approx(t / (t - 1) * (m.mft - m.mfn))
        assert len(m.forgetting) == t - 1


def test_two_tasks_by_hand():
    m = compute_cl_metrics([[90, None], [40, 70]])
    assert (m.mft, m.mfn, m.maa, m.bwt) == pytest.approx((55.0, 80.0, (90 + 55) / 2, -50.0))
    assert m.forgetting == (50.0,)


def test_single_task_bwt_and_forgetting_are_zero():
    m = compute_cl_metrics([[42.0]])
    assert (m.mft, m.mfn, m.maa, m.bwt, m.mean_forgetting) == (42.0, 42.0, 42.0, 0.0, 0.0)
    assert m.forgetting == ()


def test_paper_final_row_gives_published_mft():
    # LoRA-FT on DCL (LLaVA-1.5-7B): final accuracies and MFT 53.00 from the paper
    final = [69.65, 41.59, 25.43, 40.88, 87.45]
    a = [[final[j] if i == 4 else (50.0 if j <= i else None) for j in range(5)] for i in range(5)]
    assert round(compute_cl_metrics(a).mft, 2) == 53.00


def test_to_dict_and_frozen():
    m = compute_cl_metrics(A)
    d = m.to_dict()
    assert d == {"MFT": m.mft, "MFN": m.mfn, "MAA": m.maa, "BWT": m.bwt, "forgetting": [15.0, 10.0],
                 "mean_forgetting": 12.5, "num_tasks": 3}
    assert m.to_dict(["RS", "Med", "AD"])["forgetting"] == {"RS": 15.0, "Med": 10.0}
    with pytest.raises(ValueError, match="2 task names for 3 tasks"):
        m.to_dict(["RS", "Med"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.mft = 0.0  # type: ignore[misc]
    assert isinstance(m, CLMetrics)


@pytest.mark.parametrize("matrix,msg", [
    ([], "T = 0"),
    ([[1.0, 2.0], [3.0]], "must be square"),
    ([[1.0, 2.0]], "must be square"),
    ([[1.0], [2.0]], "must be square"),
    ([[math.nan, None], [1.0, 2.0]], r"entry \[0\]\[0\] is nan"),
    ([[1.0, None], [math.nan, 2.0]], r"entry \[1\]\[0\] is nan"),
    ([[1.0, None], [None, 2.0]], r"entry \[1\]\[0\] must be a number"),
    ([[1.0, None], [math.inf, 2.0]], r"entry \[1\]\[0\] is inf"),
    ([[101.0]], "outside"),
    ([[-0.5]], "outside"),
    ([["abc"]], "must be a number"),
    ([[True]], "must be a number"),
    (5, "sequence of rows"),
])
def test_validation_errors(matrix, msg):
    with pytest.raises(ValueError, match=msg):
        compute_cl_metrics(matrix)


def test_router_accuracy():
    assert router_accuracy(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(200 / 3)
    assert router_accuracy(["RS"] * 4, ["RS"] * 4) == 100.0
    assert router_accuracy_per_task(["a", "a", "b", "a"], ["a", "b", "b", "a"]) == {"a": 100.0, "b": 50.0}
    with pytest.raises(ValueError, match="2 entries but truth has 1"):
        router_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero requests"):
        router_accuracy([], [])
