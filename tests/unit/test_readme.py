"""The README's commands stay runnable as written.

Every command line of the ```bash blocks of README.md, docs/*.md and cluster/README.md is checked without a GPU:
``clsvc`` commands parse with the real CLI parser and their ``key=value`` overrides load through the strict
config loader (with the YAML they name), the methods, benchmarks, scorers and profiles they name exist, the repo
files they name exist, ``make`` targets exist in the Makefile, ``python -m`` modules import and ``pip install``
extras exist in pyproject.toml. The cheap ones (``clsvc ls``, ``clsvc config``, ``--dry-run``, ``--help``) are
run, in a scratch folder that sees the repo's ``workloads/``.

Convention in the Markdown: a command that needs what a test cannot give (a GPU, a cluster, a running server, a
finished run, downloads) ends with a comment ``# needs ...``, or its block opens with a ``# needs ...`` comment
line; such commands are only checked, never run. A command that asks for a GPU (``ray.use_gpu=true``,
``num_gpus`` > 0, ``--device cuda``, a ``*_gpu.yaml``) must carry the mark, unless it is submitted to a cluster
(``ray job submit -- ...``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster" / "README.md"]
REPO_PREFIXES = ("workloads/", "cluster/", "bench/", "tests/", "cl_service/", "docs/")
REPO_FILES = ("Makefile", "constraints.txt", "pyproject.toml")
PUNCT = set("();<>|&")


@dataclass(frozen=True)
class Cmd:
    """One logical command line of a ```bash block (continuations joined), without its trailing comment."""

    doc: str
    line: int
    code: str
    needs: str  # the `# needs ...` mark of the line or its block; "" when the command is meant to run anywhere

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.code}"


def _split_comment(text: str, start: int) -> tuple[str, str]:
    """Split the comment off ``text[start:]``, the line just added to a command that may span lines: a ``#``
    after whitespace and outside quotes (the quote state carries over from ``text[:start]``)."""
    quote, i = None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                i += 1
        elif ch == "\\":
            i += 1
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i >= start and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
        i += 1
    return text.rstrip(), ""


def _balanced(text: str) -> bool:
    try:
        shlex.split(text)
        return True
    except ValueError:
        return False


def _blocks(path: Path, lang: str):
    """(line number of the first line, lines) of every fenced block of ``lang`` (indented fences too)."""
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, kind, start = m.group(1), m.group(2), i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if kind == lang:
            yield start + 1, [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:j]]
        i = j + 1


def _commands(path: Path) -> list[Cmd]:
    out = []
    rel = str(path.relative_to(ROOT))
    for first, lines in _blocks(path, "bash"):
        block_needs, pending, at, seen = "", "", 0, False
        for k, raw in enumerate(lines):
            if not pending:
                if not raw.strip():
                    continue
                if raw.lstrip().startswith("#"):  # a comment line; the one that opens a block may mark it
                    text = raw.lstrip("# ").strip()
                    if not seen and text.startswith("needs"):
                        block_needs = text
                    continue
                at, seen = first + k, True
            pending, comment = _split_comment(pending + raw, len(pending))
            if pending.endswith("\\"):  # continuation
                pending = pending[:-1]
                continue
            if not _balanced(pending) or pending.endswith(("|", "&&")):  # a quote or a pipe still open
                pending += "\n"
                continue
            needs = comment if comment.startswith("needs") else block_needs
            out.append(Cmd(rel, at, pending.strip(), needs))
            pending = ""
    return out


def _simple_commands(text: str) -> list[list[str]]:
    """Split a shell line into simple commands (at ``| && ; ( )``), each a list of words."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = ""
    cmds, cur = [], []
    for tok in lex:
        if tok and set(tok) <= PUNCT:
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    out = []
    for c in cmds:
        while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]):  # VAR=value prefixes
            c = c[1:]
        if c:
            out.append(c)
    return out


ALL = [c for p in DOCS for c in _commands(p)]
README_CMDS = [c for c in ALL if c.doc == "README.md"]


# ------------------------------------------------------------------------------------------------ checks
def _parse_clsvc(args: list[str]):
    from cl_service.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(args)
        except SystemExit as e:
            if e.code == 0 and ("--help" in args or "-h" in args):
                return None
            raise AssertionError(f"clsvc {' '.join(args)}: {err.getvalue().strip()}") from None


def _check_repo_path(word: str, where: str) -> None:
    for value in (word, word.partition("=")[2]):
        value = value.rstrip(",;:")
        if value.startswith(REPO_PREFIXES) or value in REPO_FILES:
            if not any(ch in value for ch in "*<>$"):
                assert (ROOT / value).exists(), f"{where}: {value} does not exist in the repo"


def _needs_gpu(args: list[str]) -> bool:
    for a in args:
        key, _, val = a.partition("=")
        if key.endswith("use_gpu") and val.lower() in ("true", "1", "yes"):
            return True
        if key.endswith("num_gpus") and re.fullmatch(r"[0-9.]+", val) and float(val) > 0:
            return True
    return "--device" in args and args[args.index("--device") + 1].startswith("cuda") or any(
        a.endswith("_gpu.yaml") for a in args)


def _check_clsvc(args: list[str], cmd: Cmd, nested: bool) -> None:
    from cl_service import _cfgload
    from cl_service.config import RunCfg
    from cl_service.serve.config import ServeCfg

    ns = _parse_clsvc(args)
    if ns is None:  # --help
        return
    if _needs_gpu(args) and not nested:
        assert cmd.needs, f"{cmd}: asks for a GPU; mark it '# needs a GPU'"
    c = ns.cmd
    if c == "run":
        ov = list(ns.overrides) + [f"data.path={ns.data}"] * bool(ns.data) + [f"methods=[{ns.methods}]"] * bool(
            ns.methods) + [f"out={ns.out}"] * bool(ns.out)
        cfg = _cfgload.load(RunCfg, ROOT / ns.config if ns.config else None, ov)
        from cl_service.methods import METHODS

        unknown = [m for m in cfg.methods if m not in METHODS.names()]
        assert not unknown, f"{cmd}: unknown methods {unknown}"
    elif c == "sweep":
        _cfgload.load(RunCfg, ROOT / ns.config, ns.overrides)
        from cl_service.sweep.space import load_space

        load_space(ROOT / ns.space)
    elif c == "config" and ns.config_cmd == "show":
        cls = {"run": RunCfg, "serve": ServeCfg}[ns.kind]
        _cfgload.load(cls, ROOT / ns.config if ns.config else None, ns.overrides)
    elif c == "serve":
        assert not (ns.local and (ns.overrides or ns.config or ns.detach)), f"{cmd}: --local takes no Serve config"
        assert ns.local or not (ns.host or ns.tls_cert or ns.tls_key), f"{cmd}: --host/--tls-* need --local"
        ov = list(ns.overrides) + [f"results={ns.results}"] * bool(ns.results)
        _cfgload.load(ServeCfg, ROOT / ns.config if ns.config else None, ov)
    elif c == "data" and ns.data_cmd == "synth":
        from cl_service.data.synth import BENCHMARKS

        assert ns.benchmark in BENCHMARKS.names(), f"{cmd}: unknown benchmark {ns.benchmark}"
    elif c == "score":
        from cl_service.eval.scorers import SCORERS

        assert ns.scorer in SCORERS.names(), f"{cmd}: unknown scorer {ns.scorer}"
    elif c == "base" and ns.base_cmd == "build":
        from cl_service.models.config import PROFILES

        assert ns.profile in PROFILES.names(), f"{cmd}: unknown profile {ns.profile}"
    else:
        assert not getattr(ns, "overrides", None), f"{cmd}: {c} takes no key=value"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def _pyproject_extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_simple(words: list[str], cmd: Cmd, nested: bool = False) -> None:
    prog = Path(words[0]).name
    for w in words[1:]:
        _check_repo_path(w, str(cmd))
    if prog == "clsvc":
        _check_clsvc(words[1:], cmd, nested)
    elif prog == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        missing = set(targets) - _make_targets()
        assert not missing, f"{cmd}: no make target {sorted(missing)}"
    elif re.fullmatch(r"python3?(\.\d+)?", prog):
        if words[1:2] == ["-m"]:
            module = words[2]
            if module == "cl_service.cli":
                _check_clsvc(words[3:], cmd, nested)
            else:
                sys.path.insert(0, str(ROOT))
                try:
                    importlib.import_module(module)
                except ImportError as e:  # this tier blocks Ray: a module that imports it must at least exist
                    if "must not import Ray" not in str(e) or importlib.util.find_spec(module) is None:
                        raise
                finally:
                    sys.path.remove(str(ROOT))
        elif words[1:] and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{cmd}: no script {words[1]}"
            scripts = {"run_stream.py": "run", "sweep_lora.py": "sweep", "serve_experts.py": "serve"}
            sub = scripts.get(Path(words[1]).name)
            if sub:
                _check_clsvc([sub, *[w for w in words[2:] if w != "--ready-timeout"]], cmd, nested=True)
    elif prog == "ray" and words[1:3] == ["job", "submit"]:
        assert "--" in words, f"{cmd}: ray job submit without '--'"
        _check_simple(words[words.index("--") + 1:], cmd, nested=True)
    elif prog == "bash" and words[1:2] == ["-c"]:
        for sub in _simple_commands(words[2]):
            _check_simple(sub, cmd, nested)
    elif prog == "bash" and words[1:]:
        assert (ROOT / words[1]).is_file(), f"{cmd}: no script {words[1]}"
    elif prog in ("pip", "pip3") and "install" in words:
        for w in words:
            m = re.match(r"^cl-service\[([^\]]+)\]$", w.strip("'\""))
            if m:
                missing = set(m.group(1).split(",")) - _pyproject_extras()
                assert not missing, f"{cmd}: no extra {sorted(missing)} in pyproject.toml"


def _cheap(words: list[str]) -> bool:
    """Commands this test runs: they read configs and registries only (no training, no Ray, no data)."""
    if Path(words[0]).name != "clsvc" or len(words) < 2:
        return False
    return words[1] in ("ls", "config") or "--dry-run" in words or "--help" in words or "-h" in words


# ------------------------------------------------------------------------------------------------- tests
def test_the_readme_has_the_two_commands_and_marks_are_recognised():
    heads = {" ".join(s[:2]) for c in README_CMDS for s in _simple_commands(c.code)}
    assert {"make demo", "make test"} <= heads
    assert any(c.needs == "needs a GPU" for c in README_CMDS), "no '# needs a GPU' mark found"
    assert len(RUNNABLE) >= 3, "the README should show commands that run anywhere (clsvc ls, --dry-run, ...)"


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: f"{c.doc}:{c.line}")
def test_command_names_real_things(cmd: Cmd):
    for words in _simple_commands(cmd.code):
        _check_simple(words, cmd)


RUNNABLE = [(c, s) for c in README_CMDS if not c.needs for s in _simple_commands(c.code) if _cheap(s)]


@pytest.mark.parametrize("cmd,words", RUNNABLE, ids=lambda x: " ".join(x) if isinstance(x, list) else str(x.line))
def test_cheap_command_runs(cmd: Cmd, words: list[str], tmp_path, monkeypatch, capsys):
    from cl_service.cli import main

    for d in ("workloads", "cluster", "docs"):
        (tmp_path / d).symlink_to(ROOT / d)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLSVC_HOME", str(tmp_path / "home"))
    try:
        rc = main(words[1:])
    except SystemExit as e:  # --help
        rc = e.code
    out = capsys.readouterr()
    assert rc == 0, f"{cmd}: exit {rc}\n{out.err}"
    assert out.out.strip(), f"{cmd}: printed nothing"
    if words[1:3] == ["ls", "methods"]:
        from cl_service.methods import METHODS

        assert set(METHODS.names()) <= {ln.split()[0] for ln in out.out.splitlines()}
    if "--dry-run" in words and words[1] == "run":
        assert "stage 1" in out.out and "evaluate" in out.out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*")), "a dry run wrote results"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile_and_links_resolve(doc: Path):
    for first, lines in _blocks(doc, "python"):
        compile("\n".join(lines), f"{doc.name}:{first}", "exec")
    text = doc.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path = (doc.parent / target) if target else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor:  # GitHub's heading slugs
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in slugs, f"{doc.name}: no heading #{anchor} in {target or doc.name}"
    # repo paths and `python -m` modules named in inline code exist
    for span in re.findall(r"`([^`\n]+)`", text):
        words = span.split()
        for w in words:
            _check_repo_path(w, f"{doc.name}: `{span}`")
        for i, w in enumerate(words[:-1]):
            if w == "-m" and i and re.fullmatch(r"python3?", words[i - 1]):
                mod = words[i + 1]
                base = ROOT / mod.replace(".", "/")
                assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (
                    base / "__main__.py").is_file(), f"{doc.name}: no module {mod} (`{span}`)"
