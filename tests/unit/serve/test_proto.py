"""The committed cl.v1 stubs are what protoc makes of the committed .proto, and the declared floors admit them."""

import re
from pathlib import Path

import pytest

from cl_service.proto import PROTO_DIR, STUBS, generate

REPO = Path(__file__).resolve().parents[3]


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    from importlib.metadata import version

    pytest.importorskip("grpc_tools", reason="grpcio-tools is the dev extra")
    folder = generate(tmp_path)
    for name in STUBS:
        fresh, committed = (folder / name).read_text(), (PROTO_DIR / name).read_text()
        assert fresh == committed, (f"{name} is stale or hand-edited: run `python -m cl_service.proto` (with "
                                    f"grpcio-tools {version('grpcio-tools')}; constraints.txt pins the generator)")


def test_stubs_import_by_package_path_without_generation():
    from cl_service.serve.proto import load, pb2, pb2_grpc

    assert load() == (pb2, pb2_grpc)
    assert pb2.__name__ == "cl_service.proto.cl.v1.cl_pb2"
    assert pb2.DESCRIPTOR.package == "cl.v1"
    assert [m.name for m in pb2.DESCRIPTOR.services_by_name["ContinualLearning"].methods] == ["Predict", "ListExperts"]
    assert hasattr(pb2_grpc, "ContinualLearningStub") and hasattr(pb2_grpc, "add_ContinualLearningServicer_to_server")


def _floor(deps: list[str], name: str) -> tuple[int, ...]:
    spec = next(d for d in deps if re.match(rf"{name}\s*[><=]", d))
    return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def test_declared_floors_admit_the_generated_code():
    """The stubs refuse to import under an older protobuf or grpcio than the generator's: pyproject's floors
    must not promise less."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pb2_src = (PROTO_DIR / "cl_pb2.py").read_text()
    gen_pb = tuple(int(x) for x in re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2_src).groups())
    gen_grpc = tuple(int(x) for x in re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'", (PROTO_DIR / "cl_pb2_grpc.py").read_text()).group(1).split("."))
    assert _floor(deps, "protobuf") >= gen_pb
    assert _floor(deps, "grpcio") >= gen_grpc
