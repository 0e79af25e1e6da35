"""The serving catalog (what a run folder publishes), request validation and the serve config — no Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from PIL import Image

from cl_service._cfgload import ConfigError
from cl_service.adapters.registry import AdapterError, finalize_adapter
from cl_service.serve.catalog import Catalog, Limits, RequestError, parse_predict
from cl_service.serve.config import load_serve_cfg

TASKS = ["RS", "Med", "AD"]
REPO = Path(__file__).resolve().parents[3]


def _adapter(folder: Path, id: str, kind: str, task: str) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights of " + id.encode())
    finalize_adapter(folder, id=id, kind=kind, task=task, description=f"{task} domain: things", base="b", job_key="k")


@pytest.fixture
def run(tmp_path):
    (tmp_path / "config.resolved.json").write_text(json.dumps(
        {"tasks": TASKS, "base": "/b", "dataset": "/d", "seed": 0, "config": {"eval": {"max_new_tokens": 5}}}))
    for t in ("RS", "Med"):
        _adapter(tmp_path / "adapters" / "experts" / t, f"expert:{t}", "expert", t)
    _adapter(tmp_path / "adapters" / "router" / "stage-1-Med", "router:stage-1", "router", "*")
    return tmp_path


def test_catalog_lists_published_experts_and_the_latest_usable_router(run):
    cat = Catalog.load(run)
    assert [e.task for e in cat.experts] == ["RS", "Med"] and cat.stage == 1
    assert cat.router_dir == run / "adapters" / "router" / "stage-1-Med"
    assert cat.pool.experts == ("RS", "Med") and cat.pool.descriptions[1] == "Med domain: things"
    assert cat.run_setting("eval", "max_new_tokens", 8) == 5
    # a router trained for AD is not usable while AD's expert is missing
    _adapter(run / "adapters" / "router" / "stage-2-AD", "router:stage-2", "router", "*")
    assert Catalog.load(run).router_dir.name == "stage-1-Med"


def test_hot_add_changes_the_fingerprint_and_a_corrupt_expert_is_not_published(run):
    before = Catalog.load(run)
    _adapter(run / "adapters" / "experts" / "AD", "expert:AD", "expert", "AD")
    _adapter(run / "adapters" / "router" / "stage-2-AD", "router:stage-2", "router", "*")
    after = Catalog.load(run)
    assert [e.task for e in after.experts] == TASKS and after.router_dir.name == "stage-2-AD"
    assert after.fingerprint != before.fingerprint and Catalog.load(run).fingerprint == after.fingerprint
    (run / "adapters" / "experts" / "AD" / "adapter_model.safetensors").write_bytes(b"torn write")
    again = Catalog.load(run)
    assert [e.task for e in again.experts] == ["RS", "Med"] and again.router_dir.name == "stage-1-Med"


def test_feature_routers_latest_stage_with_known_experts(run):
    for stage, experts in (("stage-1-Med", ["RS", "Med"]), ("stage-2-AD", TASKS)):
        d = run / "routers" / "prototype" / stage
        d.mkdir(parents=True)
        (d / "router.json").write_text(json.dumps({"kind": "prototype", "experts": experts}))
    folder, experts = Catalog.load(run).feature_routers["prototype"]
    assert folder.name == "stage-1-Med" and experts == ("RS", "Med")  # AD's expert is not published yet


def test_find_by_task_or_id_and_not_found_lists_known(run):
    cat = Catalog.load(run)
    assert cat.find("Med").id == "expert:Med" and cat.find("expert:RS").task == "RS"
    with pytest.raises(RequestError) as ei:
        cat.find("../../etc")
    assert ei.value.code == grpc.StatusCode.NOT_FOUND and "known experts: RS, Med" in ei.value.message


def test_not_a_run_folder(tmp_path):
    with pytest.raises(AdapterError, match="not a run results folder"):
        Catalog.load(tmp_path)
    (tmp_path / "config.resolved.json").write_text(json.dumps({"tasks": TASKS}))
    with pytest.raises(AdapterError, match="no complete expert"):
        Catalog.load(tmp_path)


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


class _Req(SimpleNamespace):
    def HasField(self, name: str) -> bool:
        return getattr(self, name, None) is not None


@pytest.mark.parametrize("kw,needle", [
    ({"images": []}, "at least one image"),
    ({"images": [b""]}, "images[0]: empty bytes"),
    ({"images": [b"GIF89a broken"]}, "images[0]: not a decodable image"),
    ({"images": [b"x" * 2000]}, "over the limit of 1000"),
    ({"images": [_png(5000, 5000, "1")]}, "pixels, over the limit"),  # a small file that decodes huge
    ({"images": [_png(4, 4)] * 3}, "3 given, at most 2"),
    ({"question": " "}, "question: must not be empty"),
    ({"question": "q" * 101}, "at most 100"),
    ({"max_new_tokens": 0}, "max_new_tokens: 0 is outside [1, 16]"),
    ({"max_new_tokens": 17}, "outside [1, 16]"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(kw, needle):
    limits = Limits(max_image_bytes=1000 if kw.get("images") == [b"x" * 2000] else 10_000_000, max_images=2,
                    max_new_tokens=16, max_question_chars=100)
    req = _Req(**{"images": [_png(4, 4)], "question": "what?", "max_new_tokens": None, **kw})
    with pytest.raises(RequestError) as ei:
        parse_predict(req, limits)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in ei.value.message


def test_a_good_request_becomes_a_sample():
    sample, n = parse_predict(_Req(images=[_png(4, 4)], question="what?", max_new_tokens=3), Limits())
    assert n == 3 and sample.question == "what?" and len(sample.images) == 1
    assert parse_predict(_Req(images=[_png(4, 4)], question="q", max_new_tokens=None), Limits())[1] is None


def test_serve_config_is_strict_and_the_shipped_yaml_loads():
    cfg = load_serve_cfg(REPO / "workloads" / "configs" / "serve_dcl_mini.yaml", ["router.replicas=2"])
    assert cfg.router.replicas == 2 and 0 < cfg.expert.num_cpus < 1 and cfg.grpc_port == 9000
    with pytest.raises(ConfigError, match="unknown key"):
        load_serve_cfg(None, ["router.gpus=1"])
    with pytest.raises(ConfigError):
        load_serve_cfg(None, ["router_kind=random"])
