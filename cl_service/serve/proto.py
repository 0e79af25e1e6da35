"""Python stubs for ``proto/cl/v1/cl.proto``, generated at runtime with ``grpc_tools.protoc``.

Generated code is never committed: it is written to ``<repo>/.clsvc/proto/<digest>/`` (or a temp dir when
the repo is not writable), keyed by the .proto's sha256 and the grpcio-tools version, so a changed .proto or
toolchain regenerates. Two processes generating at once each write to a private folder and rename it into
place; the loser of the race discards its copy.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = PROTO_ROOT / "cl" / "v1" / "cl.proto"

_cache: tuple[ModuleType, ModuleType] | None = None


def _cache_root() -> Path:
    env = os.environ.get("CLSVC_PROTO_CACHE")
    if env:
        return Path(env)
    root = REPO / ".clsvc" / "proto"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "clsvc-proto"


def generate(out_root: Path | None = None) -> Path:
    """Generate (once) and return the folder holding ``cl_pb2.py`` and ``cl_pb2_grpc.py``."""
    import grpc_tools
    from grpc_tools import protoc

    src = PROTO_FILE.read_bytes()
    key = hashlib.sha256(src + getattr(grpc_tools, "__version__", "").encode()).hexdigest()[:16]
    root = Path(out_root) if out_root else _cache_root()
    final = root / key
    if (final / "cl_pb2_grpc.py").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root))
    try:
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_FILE.parent}", f"-I{include}",
                          f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_FILE)])
        if rc != 0 or not (tmp / "cl_pb2_grpc.py").is_file():
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO_FILE}")
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "cl_pb2_grpc.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load() -> tuple[ModuleType, ModuleType]:
    """``(cl_pb2, cl_pb2_grpc)``, generated if needed and imported once per process."""
    global _cache
    if _cache is None:
        folder = str(generate())
        if folder not in sys.path:
            sys.path.insert(0, folder)  # cl_pb2_grpc does `import cl_pb2`
        _cache = importlib.import_module("cl_pb2"), importlib.import_module("cl_pb2_grpc")
    return _cache
