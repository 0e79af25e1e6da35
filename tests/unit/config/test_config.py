import pytest

from cl_service._cfgload import ConfigError
from cl_service.config import RunCfg, load_run_cfg
from cl_service.registry import Registry, UnknownName

pytestmark = pytest.mark.timeout(30)


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nexpert:\n  lora: {rank: 8}\nmethods: [mrlora, oracle]\n")
    cfg = load_run_cfg(p, ["expert.lora.rank=32", "router.samples_per_task=5", "data.tasks=[RS,Med]",
                           "ray.parallel_experts=true", "expert.train.lr=1e-4"])
    assert isinstance(cfg, RunCfg) and cfg.name == "x"
    assert cfg.expert.lora.rank == 32 and cfg.router.samples_per_task == 5
    assert cfg.methods == ("mrlora", "oracle") and cfg.data.tasks == ("RS", "Med")
    assert cfg.ray.parallel_experts is True and cfg.expert.train.lr == 1e-4


@pytest.mark.parametrize("override, message", [
    (["expert.lora.rnak=3"], "unknown key(s) ['expert.lora.rnak']"),
    (["router.samples_per_task=many"], "router.samples_per_task: expected an integer"),
    (["router.mode=sometimes"], "'sometimes' is not one of"),
    (["ray.use_gpu=maybe"], "ray.use_gpu: expected true/false"),
    (["expert=3"], "expert: expected a mapping"),
    (["novalue"], "is not key=value"),
    (["expert.train.lr=0"], "expert.train: lr=0.0 is out of range (expected > 0)"),
    (["router.lora.dropout=1.5"], "router.lora: dropout=1.5 is out of range"),
    (["ray.gpus_per_worker=0"], "ray: gpus_per_worker=0.0 is out of range (expected > 0)"),
    (["data.test_limit=0"], "data: test_limit=0 is out of range (expected >= 1)"),
    (["eval.num_workers=-1"], "eval: num_workers=-1 is out of range (expected >= 0)"),
    (["expert.train.warmup_ratio=2"], "expert.train: warmup_ratio=2.0 is out of range (expected >= 0 and <= 1)"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError) as e:
        load_run_cfg(None, override)
    assert message in str(e.value)


def test_shipped_workload_configs_load():
    for name in ("dcl_mini", "acl_mini"):
        cfg = load_run_cfg(f"workloads/configs/{name}.yaml")
        assert cfg.data.benchmark == name.replace("_", "-")
    gpu = load_run_cfg("workloads/configs/dcl_7b_gpu.yaml")
    assert gpu.ray.use_gpu and gpu.ray.gpus_per_worker + gpu.eval.num_gpus <= 1.0 and gpu.expert.lora.rank == 128


def test_registry_rejects_duplicates_and_lists_known():
    r: Registry[int] = Registry("thing")
    r.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", 2)
    with pytest.raises(UnknownName, match="unknown thing 'b'; known: a"):
        r.get("b")


def test_clsvc_ls_lists_every_registry_with_descriptions(capsys):
    from cl_service.cli import main

    for what, expect in (("methods", "mrlora"), ("benchmarks", "dcl-mini"), ("scorers", "med"), ("routers", "knn"),
                         ("profiles", "llava-7b")):
        assert main(["ls", what]) == 0
        lines = capsys.readouterr().out.splitlines()
        row = next(l for l in lines if l.split()[0] == expect)
        assert len(row.split()) > 2, row  # a name and a description
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.startswith("clsvc ")


def test_base_build_force_refuses_to_delete_a_folder_that_is_not_a_built_base(tmp_path, capsys):
    from cl_service.cli import main

    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["base", "build", "--profile", "tiny", "--out", str(tmp_path), "--force"]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert "not a base built by" in capsys.readouterr().err


def test_the_config_reference_is_generated_from_the_dataclasses_and_documents_every_key():
    from pathlib import Path

    from cl_service import _cfgdoc
    from cl_service._cli_base import config_classes
    from cl_service.cli import main

    for cls in config_classes().values():
        missing = [k.key for k in _cfgdoc.keys(cls) if not k.doc]
        assert not missing, f"config keys without a docstring: {missing}"
    out = Path("docs/config.md")
    fresh = Path(__file__).parent / "_fresh_config.md"
    try:
        assert main(["config", "reference", "--out", str(fresh)]) == 0
        assert fresh.read_text() == out.read_text(), "docs/config.md is stale: run `clsvc config reference --out docs/config.md`"
    finally:
        fresh.unlink(missing_ok=True)
    assert "| `expert.train.autocast` |" in out.read_text() and "| `router.num_gpus` |" in out.read_text()


def test_config_show_prints_resolved_values_with_their_defaults_and_docs(capsys):
    from cl_service.cli import main

    assert main(["config", "show", "--config", "workloads/configs/dcl_mini.yaml", "expert.lora.rank=8"]) == 0
    text = capsys.readouterr().out
    assert "expert.lora.rank = 8  (int; default 16)" in text and "LoRA rank r" in text
    assert "ray.use_gpu = False  (bool)" in text
