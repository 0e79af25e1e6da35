"""A plain (non-editable) install serves: the wheel carries cl.proto and its stubs, declares what the library
imports, and installed with its dependencies into a fresh venv outside the checkout, `clsvc serve --local` +
`clsvc predict` answer, with every cache under ``$CLSVC_HOME``.

The fresh venv borrows nothing from the dev venv: pip resolves the wheel's declared dependencies from the package
index (or pip's cache), torch pinned first to the CPU build as the Makefile does (``torch==2.13.0``) and the rest
under ``constraints.txt``, so a dependency the wheel forgets to declare fails here. That takes minutes and needs
the package index: ``make test-wheel`` runs this file (``.ci/run`` runs it after ``make test``), ``make test`` does
not.
"""

import ast
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _sh(args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)
    assert r.returncode == 0, f"{args}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and egg-info next to them)."""
    src = tmp_path_factory.mktemp("src")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    shutil.copytree(REPO / "cl_service", src / "cl_service", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out,
         src], cwd=src)
    (whl,) = out.glob("cl_service-*.whl")
    return whl


def test_wheel_carries_the_api_and_declares_its_runtime(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for f in ("cl.proto", "cl_pb2.py", "cl_pb2_grpc.py"):
        assert f"cl_service/proto/cl/v1/{f}" in names
    runtime = {re.split(r"[\s<>=!;\[]", r, maxsplit=1)[0].lower()
               for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M) if "extra ==" not in r}
    assert {"torch", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf"} <= runtime
    assert not re.search(r"^Requires-Dist: [^;]*==", meta, re.M), "exact pins belong in constraints.txt"


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """Top-level third-party module -> {cl_service file that imports it: whether at module level, unguarded}."""
    found: dict[str, dict[str, bool]] = {}
    for f in (REPO / "cl_service").rglob("*.py"):
        tree = ast.parse(f.read_text())
        unguarded = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for n in ast.walk(tree):
            mods = ([a.name for a in n.names] if isinstance(n, ast.Import) else
                    [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else [])
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "cl_service":
                    rel = f.relative_to(REPO / "cl_service").as_posix()
                    found.setdefault(top, {})[rel] = found.get(top, {}).get(rel, False) or id(n) in unguarded
    return found


def _name(req: str) -> str:
    return re.split(r"[\s<>=!;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_dependencies_are_what_the_library_imports():
    """Outside on_ray/ (the ``ray`` extra brings what it imports), every third-party import is a declared
    dependency, or one of an extra imported only where it is used (inside a function or a ``try``), so that
    ``clsvc run/serve/predict`` need nothing undeclared; and every declared dependency is imported."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(d) for d in project["dependencies"]}
    extras = {_name(d) for reqs in project["optional-dependencies"].values() for d in reqs}
    for e in list(extras):  # and what they bring (ray[tune] brings tensorboardX)
        with contextlib.suppress(PackageNotFoundError):
            extras |= {_name(r) for r in requires(e) or ()}
    extras.add("triton")  # comes with CUDA builds of torch; models/kernels.py falls back without it
    dists = packages_distributions()
    used = set()
    for mod, files in _third_party_imports().items():
        files = {f: top for f, top in files.items() if not f.startswith("on_ray/")}
        if not files:
            continue
        names = {_name(d) for d in dists.get(mod, ())} | {_name(mod)}
        if names & declared:
            used |= names & declared
            continue
        assert names & extras, f"{mod} (imported by {sorted(files)}) is neither a dependency nor in an extra"
        assert not any(files.values()), f"{mod} is optional but imported at module level by {sorted(files)}"
    assert used == declared, f"declared but never imported: {declared - used}"


TORCH_PIN = "torch==2.13.0"  # the Makefile's CPU pin: an unpinned torch pulls GBs of CUDA packages


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A venv of its own (no system or dev-venv site-packages) with the wheel and its resolved dependencies."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _sh([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _sh([py, "-m", "pip", "install", "-q", TORCH_PIN], env=env, timeout=900)
    _sh([py, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], env=env, timeout=900)
    return venv


@pytest.mark.timeout(1800)  # the venv fixture installs torch and the dependencies first
def test_the_fresh_venv_borrows_nothing_from_the_dev_venv(fresh_venv, tmp_path):
    """What the wheel's install brought, not what the checkout's venv has: sys.path holds no folder of another
    environment, and the libraries the library imports load from the new venv."""
    out = _sh([fresh_venv / "bin" / "python", "-c",
               "import sys, torch, transformers, peft, grpc, pyarrow, cl_service\n"
               "print(sys.prefix); print(torch.__version__)\n"
               "for m in (torch, transformers, peft, grpc, pyarrow, cl_service): print(m.__file__)\n"
               "print('\\n'.join(p for p in sys.path if 'site-packages' in p))"],
              cwd=tmp_path,  # outside the checkout: `python -c` puts the working directory first on sys.path
              env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}).splitlines()
    prefix = Path(out[0]).resolve()
    assert prefix == fresh_venv.resolve(), out
    assert out[1].startswith("2.13.0"), out[1]
    for f in out[2:]:
        assert Path(f).resolve().is_relative_to(prefix), f"{f} is not from the fresh venv"
    assert not list(prefix.glob("lib/python*/site-packages/nvidia*")), "the CPU pin pulled CUDA wheels"


@pytest.mark.timeout(1800)  # the venv fixture installs torch and the dependencies first
def test_installed_wheel_serves_from_outside_the_checkout(tmp_path_factory, fresh_venv, tiny_run, dcl_shards):
    from cl_service.data.shards import ShardDataset

    sample = next(iter(ShardDataset(dcl_shards).iter_samples("Med", "test")))
    cwd = tmp_path_factory.mktemp("elsewhere")
    (cwd / "q.png").write_bytes(sample.images[0])
    home = cwd / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLSVC_MODEL_STORE", "VIRTUAL_ENV")}
    env.update(CLSVC_HOME=str(home), OMP_NUM_THREADS="1")
    bin_ = fresh_venv / "bin"

    where = _sh([bin_ / "python", "-c", "import cl_service.serve.proto as p, cl_service.models.store as s; "
                 "print(p.__file__); print(p.pb2.__file__); print(s.store_dir())"], cwd=cwd, env=env).split()
    assert all(Path(w).resolve().is_relative_to(fresh_venv.resolve()) for w in where[:2]), where
    assert where[2] == str(home / "models")

    proc = subprocess.Popen([bin_ / "clsvc", "serve", "--local", "--results", tiny_run, "--port", "0",
                             "--max-batch", "2"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert "on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        ask = subprocess.run([bin_ / "clsvc", "predict", "--address", f"127.0.0.1:{port}", "--image", "q.png",
                              "--question", sample.question], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=90)
        assert ask.returncode == 0, ask.stderr
        assert ask.stdout.endswith("\n"), ask.stdout  # the answer's line (the tiny model may answer "")
        assert re.search(r"^expert (RS|Med) via mllm\b", ask.stderr, re.M), ask.stderr  # how it was chosen
        proc.send_signal(signal.SIGTERM)
        assert proc.communicate(timeout=60)[0].strip().endswith("stopped") and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    site = Path(where[0]).parents[2]  # .../site-packages/cl_service/serve/proto.py
    assert not list(site.rglob(".clsvc")), "nothing may be written into site-packages"
