"""Task orders of a study (Latin-square rows, orders files, seeds) and ``data.order`` of a run."""

import pytest

from cl_service.config import DataCfg, load_run_cfg
from cl_service.study.orders import OrderError, latin_orders, parse_seeds, read_orders, study_orders

TASKS = ("RS", "Med", "AD", "Sci", "Fin")


def test_benchmark_order_first_then_latin_rows_balancing_positions():
    orders = latin_orders(TASKS, 5, seed=0)
    assert orders[0] == TASKS and len(set(orders)) == 5
    for pos in range(5):  # a full cyclic Latin square: every task at every position exactly once
        assert sorted(o[pos] for o in orders) == sorted(TASKS)
    three = latin_orders(TASKS, 3, seed=0)
    assert three == orders[:3]  # seeded: the same rows again, in the same order
    for pos in range(5):  # fewer rows than tasks: no task holds a position twice
        assert len({o[pos] for o in three}) == 3
    assert latin_orders(TASKS, 3, seed=1) != three or latin_orders(TASKS, 3, seed=2) != three
    assert all(o in {tuple(TASKS[(r + j) % 5] for j in range(5)) for r in range(5)} for o in three)


def test_more_orders_than_tasks_come_from_further_squares_without_repeats():
    orders = latin_orders(("A", "B", "C"), 6, seed=0)
    assert len(set(orders)) == 6  # every permutation of 3 tasks
    with pytest.raises(OrderError, match="only 6"):
        latin_orders(("A", "B", "C"), 7)
    with pytest.raises(OrderError, match="at least one"):
        latin_orders(TASKS, 0)


def test_orders_file(tmp_path):
    f = tmp_path / "orders.txt"
    f.write_text("# my curricula\nFin Sci AD Med RS\n\nRS,Med, AD , Sci,Fin  # the benchmark's\n")
    assert read_orders(f, TASKS) == [("Fin", "Sci", "AD", "Med", "RS"), TASKS]
    assert study_orders(str(f), TASKS) == read_orders(f, TASKS)
    assert study_orders("2", TASKS) == latin_orders(TASKS, 2)
    for text, msg in (("RS Med AD Sci\n", "missing \\['Fin'\\]"), ("RS Med AD Sci Fin Ocr\n", "unknown \\['Ocr'\\]"),
                      ("RS RS AD Sci Fin\n", "more than once"), ("RS Med AD Sci Fin\nRS Med AD Sci Fin\n", "twice"),
                      ("# nothing\n", "no order")):
        f.write_text(text)
        with pytest.raises(OrderError, match=msg):
            read_orders(f, TASKS)
    with pytest.raises(OrderError, match="neither a number"):
        study_orders(str(tmp_path / "absent.txt"), TASKS)


def test_seeds():
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("0,5") == (0, 5) and parse_seeds("5,") == (5,)
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_data_order_is_a_validated_permutation_of_the_stream():
    d = DataCfg(order=("Med", "RS"), tasks=("RS", "Med"))
    assert d.stream(TASKS) == ["Med", "RS"]
    assert DataCfg().stream(TASKS) == list(TASKS) and DataCfg(tasks=("Med", "RS")).stream(TASKS) == ["RS", "Med"]
    assert DataCfg(order=tuple(reversed(TASKS))).stream(TASKS) == list(reversed(TASKS))
    with pytest.raises(ValueError, match="not a permutation of the stream's tasks .* \\(missing \\['Sci'\\]\\)"):
        DataCfg(order=("RS", "Med", "AD", "Fin")).stream(TASKS)
    with pytest.raises(ValueError, match="not in it: \\['Ocr'\\]"):
        DataCfg(order=("RS", "Med", "AD", "Fin", "Sci", "Ocr")).stream(TASKS)
    with pytest.raises(ValueError, match="not all in the dataset's stream"):
        DataCfg(tasks=("RS", "Ocr")).stream(TASKS)
    for bad, msg in (("data.order=[RS,RS]", "names a task twice"),
                     ("data.order=[RS,AD]", "not a permutation of data.tasks")):
        with pytest.raises(ValueError, match=msg):
            load_run_cfg(None, ["data.tasks=[RS,Med]", bad])


def test_a_run_refuses_a_bad_order_before_any_work(tmp_path, dcl_shards):
    from cl_service.run import plan_stream, run_stream

    cfg = load_run_cfg(None, [f"out={tmp_path / 'run'}", f"data.path={dcl_shards}", "data.order=[Med,RS]",
                              "methods=[oracle]", "ray.num_workers=0"])
    with pytest.raises(ValueError, match="data.order \\['Med', 'RS'\\] is not a permutation"):
        run_stream(cfg)
    assert not (tmp_path / "run" / "config.resolved.json").exists()
    ok = load_run_cfg(None, [f"out={tmp_path / 'run'}", f"data.path={dcl_shards}", "data.tasks=[RS,Med]",
                             "data.order=[Med,RS]", "methods=[oracle]"])
    plan = plan_stream(ok)
    assert [(s["task"], s["train"]) for s in plan] == [("Med", ["expert/Med"]), ("RS", ["expert/RS"])]
