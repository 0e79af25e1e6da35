"""study.json and report.md of a hand-checkable study: 3 cells (2 orders) of two methods on 2 tasks x 2 items."""

import itertools
import json
import math
import re

import numpy as np
import pytest
from scipy import stats as sps

from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset, ShardWriter
from cl_service.eval.confusion import stage_confusion
from cl_service.eval.metrics import compute_cl_metrics
from cl_service.eval.predictions import prediction_record, write_predictions
from cl_service.study.cell import summary
from cl_service.study.items import load_test_items
from cl_service.study.plan import Cell, cell_dir
from cl_service.study.report import write_study

ITEMS = {"A": ["a1", "a2"], "B": ["b1", "b2"]}
# cell -> method -> {(stage, task): right answers (1) per item}; "x" is routed (b2 of o0-s0 went to A's expert)
CELLS = {
    ("o0-s0", ("A", "B")): {"x": {(0, "A"): [1, 1], (1, "A"): [1, 0], (1, "B"): [1, 1]},
                            "y": {(0, "A"): [1, 0], (1, "A"): [1, 0], (1, "B"): [0, 0]}},
    ("o0-s1", ("A", "B")): {"x": {(0, "A"): [1, 1], (1, "A"): [1, 1], (1, "B"): [1, 0]},
                            "y": {(0, "A"): [0, 0], (1, "A"): [0, 0], (1, "B"): [1, 0]}},
    ("o1-s0", ("B", "A")): {"x": {(0, "B"): [1, 1], (1, "B"): [1, 1], (1, "A"): [1, 1]},
                            "y": {(0, "B"): [1, 1], (1, "B"): [0, 1], (1, "A"): [0, 0]}},
}
MISROUTED = {("o0-s0", "b2"): "A"}


def _dataset(path):
    with ShardWriter(path, [{"name": t, "scorer": "exact", "description": t} for t in ITEMS]) as w:
        for t, ids in ITEMS.items():
            w.add(Sample(t, "train", f"{t}-train", [], "q?", ["yes"], "exact"))
            for q in ids:
                w.add(Sample(t, "test", q, [], f"question {q}", [f"answer {q}"], "exact"))
    return path


def _write_cell(study, cid, order, methods):
    out = study / "cells" / cid
    metrics = {"benchmark": "hand", "tasks": list(order), "methods": {}}
    for name, entries in methods.items():
        T = len(order)
        matrix = [[None] * T for _ in range(T)]
        for i in range(T):
            for j in range(T):  # every task is answered at every stage; only j <= i is scored here
                t = order[j]
                right = entries.get((i, t), [0, 0])
                recs = []
                for q, ok in zip(ITEMS[t], right):
                    expert = MISROUTED.get((cid, q), t) if name == "x" else None
                    recs.append(prediction_record(q, "", f"answer {q}" if ok else "no", f"{name}@{order[i]}",
                                                  {"expert": expert}))
                write_predictions(out / "predictions" / name / f"stage-{i}-{order[i]}" / f"{t}.jsonl", recs)
                matrix[i][j] = 100.0 * sum(right) / len(right)
        entry = {"matrix": matrix, **compute_cl_metrics(matrix).to_dict(list(order))}
        if name == "x":
            entry["router_accuracy"] = {t: 100.0 * sum(MISROUTED.get((cid, q), t) == t for q in ITEMS[t]) / 2
                                        for t in order}
            entry["confusion"] = [stage_confusion(out, name, i, list(order)) for i in range(T)]
        metrics["methods"][name] = entry
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


@pytest.fixture
def study(tmp_path):
    ds = ShardDataset(_dataset(tmp_path / "data"))
    cells, records = [], {}
    for k, ((cid, order), methods) in enumerate(CELLS.items()):
        m = _write_cell(tmp_path, cid, order, methods)
        cell = Cell(int(cid[1]), order, int(cid[-1]))
        assert cell.id == cid and cell_dir(tmp_path, cell).is_dir()
        cells.append(cell)
        records[cid] = {"run": f"cells/{cid}", "metrics": summary(m), "wall_s": 10.0 + k}
    return {"out": tmp_path, "cells": cells, "records": records, "samples": load_test_items(ds, list(ITEMS))}


def _write(s, cells=None):
    cells = s["cells"] if cells is None else cells
    return write_study(s["out"], cells, s["cells"], s["records"], ["x", "y"], s["samples"],
                       {"benchmark": "hand", "orders": [("A", "B"), ("B", "A")], "seeds": (0, 1),
                        "jobs": {"jobs": 12, "trainings": 8, "shared": 4, "from_cache": 4, "copies": 0},
                        "trained": 8, "wall_s": 33.0, "command": "clsvc study --orders 2 --seeds 2"})


def test_hand_checkable_numbers_tables_and_plots(study):
    r = _write(study)
    x, y = r["methods"]["x"], r["methods"]["y"]
    # MFT per cell by hand: x 75, 75, 100; y 25, 25, 25
    assert x["MFT"]["values"] == {"o0-s0": 75.0, "o0-s1": 75.0, "o1-s0": 100.0}
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean([75, 75, 100]), scale=sps.sem([75, 75, 100]))
    assert (x["MFT"]["mean"], x["MFT"]["low"], x["MFT"]["high"]) == (pytest.approx(250 / 3), pytest.approx(lo),
                                                                     pytest.approx(hi))
    assert x["MFT"]["method"].startswith("t interval over 3 cells") and x["MFT"]["n"] == 3
    assert y["MFT"]["low"] == y["MFT"]["high"] == 25.0  # no spread across cells
    # MFN x: 100, 75, 100; BWT x: -50, 0, 0; MAA y: 37.5, 12.5, 62.5; router acc x: 75, 100, 100
    assert x["MFN"]["values"] == {"o0-s0": 100.0, "o0-s1": 75.0, "o1-s0": 100.0}
    assert x["BWT"]["values"] == {"o0-s0": -50.0, "o0-s1": 0.0, "o1-s0": 0.0}
    assert y["MAA"]["values"] == {"o0-s0": 37.5, "o0-s1": 12.5, "o1-s0": 62.5}
    assert x["router_acc"]["values"] == {"o0-s0": 75.0, "o0-s1": 100.0, "o1-s0": 100.0} and "router_acc" not in y
    # paired x - y on MFT: per-cell differences 50, 50, 75; the p-value of the sign flips over the 12 items
    c = next(c for c in r["comparisons"] if c["metric"] == "MFT")
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean([50, 50, 75]), scale=sps.sem([50, 50, 75]))
    assert (c["a"], c["b"], c["mean"], c["low"], c["high"]) == ("x", "y", pytest.approx(175 / 3), pytest.approx(lo),
                                                               pytest.approx(hi))
    d = [50.0 / 6 * (a - b) for cid, o in CELLS for t in o for a, b in zip(CELLS[(cid, o)]["x"][(1, t)],
                                                                           CELLS[(cid, o)]["y"][(1, t)])]
    nz = [v for v in d if v]
    exact = np.mean([abs(sum(s * v for s, v in zip(signs, nz))) >= abs(sum(nz)) - 1e-9
                     for signs in itertools.product((1, -1), repeat=len(nz))])
    assert c["units"] == 12 and c["p_value"] == pytest.approx(exact, abs=0.01)
    # order effects: x learned A first in o0-*, final 50 and 100; second in o1-s0, final 100
    pos = r["order_effects"]["x"]["final_accuracy_by_position"]["A"]
    assert pos == [{"mean": 75.0, "n": 2}, {"mean": 100.0, "n": 1}]
    spread = r["order_effects"]["x"]["spread_across_orders"]["MFT"]
    assert spread["per_order"] == {"o0": 75.0, "o1": 100.0} and spread["range"] == 25.0
    assert spread["sd"] == pytest.approx(math.sqrt(2 * 12.5 ** 2))
    # routing summed over cells at the last stage: 5 of B's 6 items to B, 1 to A
    assert r["routing"]["x"]["confusion_per_stage"][-1]["B"] == {"B": 5, "A": 1}
    assert r["accuracy_by_position"]["x"]["mean"][1] == [pytest.approx(250 / 3), pytest.approx(250 / 3)]

    md = (study["out"] / "report.md").read_text()
    flat = re.sub(" +", " ", md)
    assert f"| x      | 83.33 [{x['MFT']['low']:.2f}, {x['MFT']['high']:.2f}]" in md
    assert "| y      | 25.00 [25.00, 25.00]" in md
    it = c["items"]
    assert it["method"].startswith("percentile bootstrap over test items") and it["low"] <= c["mean"] <= it["high"]
    assert (f"| x | y | MFT | 58.33 [{c['low']:.2f}, {c['high']:.2f}] | [{it['low']:.2f}, {it['high']:.2f}] | "
            f"{c['p_value']:.3f} | 12") in flat
    assert "| A | 75.0 (n=2) | 100.0 (n=1) |" in flat
    assert "| B | 6 | 16.67 | 83.33 |" in flat  # the confusion row of B: 1 of 6 to A, 5 to B
    assert "Training jobs: 12 in all cells, 8 distinct trainings, 4 shared" in md
    for png in ("metrics_ci.png", "matrix_x.png", "matrix_y.png"):
        assert f"]({png})" in md and (study["out"] / png).stat().st_size > 1000
    assert str(study["out"]) not in md + (study["out"] / "study.json").read_text()
    assert json.loads((study["out"] / "study.json").read_text())["methods"]["x"]["MFT"]["mean"] == pytest.approx(250 / 3)


def test_two_cells_get_the_item_bootstrap(study):
    r = _write(study, study["cells"][:2])
    m = r["methods"]["x"]["MFT"]
    assert m["n"] == 2 and m["method"].startswith("percentile bootstrap over test items")
    assert m["mean"] == 75.0 and m["low"] <= 75.0 <= m["high"] and m["high"] - m["low"] > 0
    assert r["cells_total"] == 3 and [c["id"] for c in r["cells"]] == ["o0-s0", "o0-s1"]


def test_predictions_that_do_not_reproduce_the_matrix_are_an_error(study):
    f = study["out"] / "cells" / "o0-s1" / "predictions" / "y" / "stage-1-B" / "B.jsonl"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["text"] = "answer b2"  # now right, but metrics.json says 50
    f.write_text("\n".join([lines[0], json.dumps(rec)]) + "\n")
    with pytest.raises(ValueError, match="score 100.0000 on B, metrics.json says 50.0000"):
        _write(study)
