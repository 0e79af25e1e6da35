"""Existing methods keep their job keys: a results folder trained before the method seam (adapter families, method
options, generated replay variants) still recognises every finished adapter. The keys below were computed on the
code before that change; base and dataset digests are fixed here (the driver stamps the base's digest on every job,
and the dataset is hashed by its manifest), so the keys depend on the job descriptions alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_service.config import load_run_cfg
from cl_service.methods import METHODS, StageContext
from cl_service.models.placement import resolve_base_dtype, resolve_run_cfg
from cl_service.train import job as job_mod

TASKS = ["RS", "Med"]
DESCRIPTIONS = {"RS": "remote sensing images", "Med": "medical images"}
OVERRIDES = ["data.tasks=[RS,Med]", "expert.train.max_steps=3", "expert.train.batch_size=4", "router.train.max_steps=3",
             "router.samples_per_task=4", "replay.samples_per_task=2", "expert.lora.rank=4", "router.lora.rank=4",
             "clmoe.experts=2"]

# job name -> (key, weights_key), per resolved config: ``cpu`` as above, ``gpu`` with ray.use_gpu=true (bf16 base,
# GPU training options), router.mode=continue and clmoe.paper=true.
GOLDEN: dict[str, dict[str, tuple[str, str]]] = {
    "cpu": {
        "clmoe/stage-0": ("a0c7608a4af1b36f", "2c3f3cb4c104a0ea"),
        "clmoe/stage-1": ("d6457092ca431065", "cfcde30e26653dae"),
        "clmoe_replay/stage-0": ("13b372577933ac3e", "2c3f3cb4c104a0ea"),
        "clmoe_replay/stage-1": ("d789eed077c8176a", "4d6ae4183fb0c673"),
        "moelora_replay/stage-0": ("0f38bc55502442a7", "484e50e285920652"),
        "moelora_replay/stage-1": ("f91520bfd2d7a722", "10a67a4c568bd91a"),
        "olora_replay/stage-0": ("74a4b709117864d8", "945c08b05f46624a"),
        "olora_replay/stage-1": ("f90caa18f63db03e", "9b35fabbeb955d43"),
        "expert/Med": ("bd60df7fbf03d4db", "b7db07e8563cd861"),
        "expert/RS": ("660113963a7a63f2", "945c08b05f46624a"),
        "joint/all": ("2435aea44192f965", "3701732004f6b7ac"),
        "lora_ft/stage-0": ("c6c5c7e69860cf15", "945c08b05f46624a"),
        "lora_ft/stage-1": ("76fb075792f682dc", "2dc34f97cdde006f"),
        "lora_ft_replay/stage-0": ("00445604c14b41ca", "945c08b05f46624a"),
        "lora_ft_replay/stage-1": ("fc41202e9f409910", "aecc27de093669d3"),
        "moelora/stage-0": ("6aaa5124509bc23c", "484e50e285920652"),
        "moelora/stage-1": ("db283db2bb5d19ca", "9272867c47bf6b7a"),
        "olora/stage-0": ("298ffe4a18a6659d", "945c08b05f46624a"),
        "olora/stage-1": ("4b1da07fecc38866", "95c3a3e05d14f23a"),
        "router/stage-1": ("f6c83ffc41a1d557", "0b4fbf98bf758dc4"),
    },
    "gpu": {
        "clmoe/stage-0": ("22d5080e19d69480", "adfaf39b78fe2334"),
        "clmoe/stage-1": ("9fe6282b9e85cc24", "c844511307b689a5"),
        "clmoe_replay/stage-0": ("3a6a1d562190723c", "adfaf39b78fe2334"),
        "clmoe_replay/stage-1": ("9f6ab70c62ce2ce5", "98798f8a53f9b97d"),
        "moelora_replay/stage-0": ("8700b29556b18484", "968cae48c4238263"),
        "moelora_replay/stage-1": ("399215ece2c5d15e", "1d0be2776649e161"),
        "olora_replay/stage-0": ("f089c7daa3a57c70", "0b731b49da5b7cc7"),
        "olora_replay/stage-1": ("d0dec5dafc0e54ae", "f9cc90a7681bd930"),
        "expert/Med": ("61e483fbbe03e6a6", "5c87da9acd643a78"),
        "expert/RS": ("2d1f0472d2d8cc96", "0b731b49da5b7cc7"),
        "joint/all": ("7b11c094f446a4eb", "3550e55c08f7ed5a"),
        "lora_ft/stage-0": ("acfa20a54ab1e989", "0b731b49da5b7cc7"),
        "lora_ft/stage-1": ("351679761e16d188", "1a4bc9edd0237d55"),
        "lora_ft_replay/stage-0": ("bb74ddaa8d269602", "0b731b49da5b7cc7"),
        "lora_ft_replay/stage-1": ("94c4e2282525a85a", "9feea05f2f3cff3a"),
        "moelora/stage-0": ("d2efe25c03baa536", "968cae48c4238263"),
        "moelora/stage-1": ("75c8fc3b49f63f4c", "fbf3e90d811c0dd7"),
        "olora/stage-0": ("b029586f41f7e46a", "0b731b49da5b7cc7"),
        "olora/stage-1": ("52035ebfe4845ea5", "1fb4f4d79a74cdcd"),
        "router/stage-1": ("7dfe5d7f8fa0ffae", "4a922167aa6f4992"),
    },
}


def _keys(extra: list[str]) -> dict[str, tuple[str, str]]:
    cfg = resolve_run_cfg(load_run_cfg(None, OVERRIDES + extra))
    base_dtype = resolve_base_dtype(cfg)
    extras = {"base_path": "/bases/tiny", "dataset": "/data/dcl", "base_digest": "b" * 16}
    out: dict[str, tuple[str, str]] = {}
    for name in sorted(set(GOLDEN_METHODS + LATER_METHODS)):
        method = METHODS.get(name)()
        for stage in range(len(TASKS)):
            ctx = StageContext(stage, TASKS, DESCRIPTIONS, Path("/runs/golden"), cfg, None, extras)
            for job in method.jobs(ctx):
                # as the run's driver stamps every job (cl_service.run)
                if base_dtype or cfg.base.prompt_style != "auto":
                    job = job.replace(base_dtype=base_dtype, prompt_style=cfg.base.prompt_style)
                job = job.replace(base_digest=extras["base_digest"])
                assert out.setdefault(job.name, (job.key(), job.weights_key())) == (job.key(), job.weights_key())
    return out


GOLDEN_METHODS = ["joint", "lora_ft", "lora_ft_replay", "moelora", "mrlora", "mrlora_knn", "mrlora_proto", "mrlora_ridge",
                  "olora", "oracle", "zero_shot"]
# Methods added with the method seam (generated replay variants, clmoe): their keys as first published, so that a
# later change to the seam cannot move them either. ``clmoe.paper`` on in the gpu setting.
LATER_METHODS = ["clmoe", "clmoe_replay", "moelora_replay", "olora_replay"]


@pytest.mark.parametrize("setting, extra", [("cpu", []), ("gpu", ["ray.use_gpu=true", "router.mode=continue", "clmoe.paper=true"])])
def test_existing_methods_keep_their_job_keys(monkeypatch, setting, extra):
    monkeypatch.setattr(job_mod, "_dataset_fingerprint", lambda path: "d" * 16)
    got = _keys(extra)
    assert got == GOLDEN[setting]
