"""``modalprompt`` through the CLI: ``--dry-run`` lists its jobs (the replay row's first stage cloned), a run trains and
evaluates it and reports its prompt choice like a router's, ``clsvc serve`` refuses a run of it alone saying why,
``clsvc adapters export`` refuses its adapter, ``clsvc ls methods`` lists it and its example config loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_modalprompt_from_the_command_line(tmp_path, tiny_base, dcl_shards, capsys, monkeypatch):
    from cl_service.cli import main
    from cl_service.config import load_run_cfg

    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["run", "--data", str(dcl_shards), "--out", str(out), "--methods", "modalprompt,modalprompt_replay",
            f"base.path={tiny_base}", "data.tasks=[RS,Med]", "modalprompt.prompts=2", "modalprompt.train.max_steps=1",
            "modalprompt.train.batch_size=4", "data.train_limit=4", "data.test_limit=2", "eval.max_new_tokens=2",
            "ray.num_workers=0"]
    assert main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "modalprompt/stage-0" in plan and "modalprompt/stage-1, modalprompt_replay/stage-1" in plan
    assert any("identical" in line and "modalprompt_replay/stage-0" in line for line in plan.splitlines())
    assert not out.exists()

    assert main(args) == 0  # trains and evaluates it in this process
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    for name in ("modalprompt", "modalprompt_replay"):
        m = metrics[name]
        assert m["router"] == "modalprompt" and set(m["router_accuracy"]) == {"RS", "Med"}
        preds = [json.loads(line) for f in (out / "predictions" / name).rglob("*.jsonl")
                 for line in f.read_text().splitlines()]
        assert preds and all(p["metadata"]["expert"] in ("RS", "Med") for p in preds)
    report = (out / "report.md").read_text().splitlines()
    for name in ("modalprompt", "modalprompt_replay"):  # its rows in the comparison, router and stage-time tables
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in report if line.startswith(f"| {name} ")]
        assert sum(r[1] == "modalprompt" for r in rows) == 1 and len(rows) == 4, rows
    final = json.loads((out / "adapters" / "modalprompt_replay" / "stage-1-Med" / "modalprompt_config.json").read_text())
    assert final["tasks"] == ["RS", "Med"] and final["prompts"] == 2

    assert main(["serve", "--local", "--results", str(out), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "holds no complete expert adapter" in err and "modalprompt is soft prompts inserted after BOS" in err
    assert main(["adapters", "export", str(out), "--format", "peft", "--expert", "modalprompt:stage-1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "is a ModalPrompt adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()

    assert main(["ls", "methods"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert any(r[0] == "modalprompt" and len(r) > 2 for r in rows if r)
    example = Path("workloads/configs/modalprompt_dcl_mini.yaml")
    assert example.read_text().startswith(f"# clsvc run --config {example}")
    cfg = load_run_cfg(example)
    assert "modalprompt" in cfg.methods and cfg.modalprompt.prompts == 20
