"""SPACE.yaml parsing and validation, and the deterministic expansion into trials (no Ray)."""

import pytest

from cl_service._cfgload import ConfigError
from cl_service.sweep.space import expand, load_base, parse_space, trial_cfg


def _space(space, **sweep):
    return parse_space({"space": space, "sweep": sweep})


def test_grid_with_tied_alpha_expands_to_the_product_last_key_fastest():
    sp = _space({"router.samples_per_task": [2, 5], "expert.lora.rank": [2, 4, 8],
                 "expert.lora.alpha": "2*expert.lora.rank"})
    trials = expand(sp, load_base(None))
    assert [(t.params["router.samples_per_task"], t.params["expert.lora.rank"]) for t in trials] == \
        [(2, 2), (2, 4), (2, 8), (5, 2), (5, 4), (5, 8)]
    assert all(t.params["expert.lora.alpha"] == 2.0 * t.params["expert.lora.rank"] for t in trials)
    assert len({t.id for t in trials}) == 6
    cfg = trial_cfg(load_base(None), trials[4], "/tmp/x")
    assert (cfg.expert.lora.rank, cfg.expert.lora.alpha, cfg.router.samples_per_task, cfg.out) == (4, 8.0, 5, "/tmp/x")


def test_tie_by_suffix_and_mapping_form_and_free_alpha():
    sp = _space({"expert.lora.rank": [4], "expert.lora.alpha": {"tie": "rank", "scale": 0.5}})
    assert expand(sp)[0].params["expert.lora.alpha"] == 2.0
    free = _space({"expert.lora.rank": [4, 8], "expert.lora.alpha": [8, 64]})
    assert len(expand(free)) == 4


def test_random_search_is_seeded_bounded_and_typed():
    space = {"expert.train.lr": {"loguniform": [1e-4, 1e-2]}, "router.samples_per_task": {"randint": [2, 10]},
             "methods": {"choice": [["mrlora"], ["mrlora_proto"]]}, "expert.lora.rank": [2, 4]}
    a = expand(_space(space, num_samples=5, seeds=[0, 1]), load_base(None))
    b = expand(_space(space, num_samples=5, seeds=[0, 1]), load_base(None))
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]  # a restarted sweep draws the same trials
    assert len(a) == 5 * 2  # a trial runs its configuration at both seeds
    assert all(1e-4 <= t.params["expert.train.lr"] <= 1e-2 for t in a)
    assert all(isinstance(t.params["router.samples_per_task"], int) and 2 <= t.params["router.samples_per_task"] <= 10
               for t in a)
    assert {tuple(t.params["methods"]) for t in a} <= {("mrlora",), ("mrlora_proto",)}
    # as in Tune: every (sample, grid point) draws fresh values; seeds repeat the same configuration
    assert len({t.params["expert.train.lr"] for t in a}) == 5 * 2
    c = expand(_space(space, num_samples=5, seeds=[0, 1], sample_seed=1))
    assert [t.params["expert.train.lr"] for t in c] != [t.params["expert.train.lr"] for t in a]
    assert {t.seeds for t in a} == {(0, 1)}


@pytest.mark.parametrize("space,sweep,msg", [
    ({"expert.lora.rnk": [2]}, {}, "unknown key 'rnk'"),
    ({"expert.lora": [2]}, {}, "is a section"),
    ({"expert.lora.rank": []}, {}, "empty list"),
    ({"expert.lora.rank": ["big"]}, {}, "expected an integer"),
    ({"expert.lora.rank": {"uniform": [2, 8]}}, {}, "expected an integer"),
    ({"expert.train.lr": {"loguniform": [0, 1e-2]}}, {}, "low > 0"),
    ({"expert.train.lr": {"uniform": [1e-2, 1e-3]}}, {}, "low < high"),
    ({"expert.train.lr": {"normal": [0, 1]}}, {}, "not a distribution"),
    ({"expert.lora.alpha": "2*rank"}, {}, "not a swept key"),
    ({"expert.lora.rank": [2], "router.lora.rank": [2], "expert.lora.alpha": "2*rank"}, {}, "ambiguous"),
    ({"expert.lora.rank": [2], "expert.lora.alpha": {"tie": "rank", "factor": 2}}, {}, "unknown option"),
    ({"seed": [0, 1]}, {}, "sweep.seeds"),
    ({"out": ["a"]}, {}, "own folder"),
    ({"methods": [["mrlora"]]}, {"metric": "loss"}, "sweep.metric"),
    ({"expert.lora.rank": [2]}, {"num_samples": 3}, "repeats identical trials"),
    ({"expert.lora.rank": [2]}, {"seeds": []}, "at least one seed"),
    ({"expert.lora.rank": [2]}, {"asha": {"grace_period": 0}}, "grace_period"),
    ({"expert.lora.rank": [2]}, {"typo": 1}, "unknown key"),
])
def test_invalid_spaces_fail_with_a_message_naming_the_key(space, sweep, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_space({"space": space, "sweep": sweep})


def test_top_level_and_config_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level"):
        parse_space({"space": {"expert.lora.rank": [2]}, "sweeps": {}})
    with pytest.raises(ConfigError, match="'space' must map"):
        parse_space({"sweep": {}})
    with pytest.raises(ConfigError, match="sideways"):
        _space({"router.mode": ["retrain", "sideways"]})
    from cl_service.sweep.space import load_space

    bad = tmp_path / "s.yaml"
    bad.write_text("space: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_space(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "missing.yaml")


def test_shipped_space_file_is_valid_and_has_nine_trials():
    from cl_service.sweep.space import load_space

    trials = expand(load_space("workloads/configs/space_rank_router.yaml"),
                    load_base("workloads/configs/sweep_dcl_mini.yaml"))
    assert len(trials) == 9
    assert {t.params["expert.lora.rank"] for t in trials} == {2, 4, 8}
    assert {t.params["router.samples_per_task"] for t in trials} == {2, 5, 10}
