"""Committed results speak of the project alone: no file under results/ or bench/results/ holds a path of the
machine that wrote it, their names say hardware and date rather than how a measurement was scheduled, every
result file the docs link exists, and the benches' aggregates count a copied job once."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULT_DIRS = [ROOT / "results", ROOT / "bench" / "results"]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# An absolute filesystem path: a "/" that starts a word (not "tokens/s", "1/2", "http://", "$TMPDIR/x", "~/x")
# followed by at least one "name/" (so "/ 64" and a lone "/s" are not paths).
ABSOLUTE = re.compile(r"(?<![\w.~$})\-/:\\])/(?:[\w.@+-]+/)+[\w.@+-]*")
# Words of how the work was organised, not of the project.
PROCESS = re.compile(r"\b(?:sessions?|helpers?|device (?:calls?|time|tool)|budget|stop \d+|issue \d+|"
                     r"calls? \d+|part \d+ of|s\d+call\d+)\b", re.I)
PROCESS_OK = re.compile(r"token budget|time_budget_s", re.I)  # the model's token budget; Tune's own key


def _text_files():
    for d in RESULT_DIRS:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                try:
                    yield p, p.read_text()
                except UnicodeDecodeError:  # plots
                    continue


def test_the_pattern_finds_absolute_paths_and_nothing_else():
    hits = ["/work/main/runs/dcl-mini/data", '"out": "/root/out/serve.json"', "File \"/opt/x/.venv/lib/a.py\"",
            "--results /tmp/ci-fresh/runs/dcl-mini", "(/home/u/x)"]
    misses = ["18,333 tokens/s", "p50 / p99", "1/2/4/8", "http://127.0.0.1:8265/x", "$TMPDIR/clsvc-real/run",
              "~/.ray/auth_token", "bench/results/h200/real_run.json", "s/step", "a / b / c"]
    assert all(ABSOLUTE.search(h) for h in hits), [h for h in hits if not ABSOLUTE.search(h)]
    assert not any(ABSOLUTE.search(m) for m in misses), [m for m in misses if ABSOLUTE.search(m)]


def test_no_committed_result_holds_a_path_of_the_machine_that_wrote_it():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, text in _text_files() for m in ABSOLUTE.finditer(text)]
    assert not bad, "absolute paths in committed results:\n" + "\n".join(bad[:20])


def test_result_names_and_docs_speak_of_the_project():
    names = [str(p.relative_to(ROOT)) for d in RESULT_DIRS for p in d.rglob("*") if PROCESS.search(p.name)]
    assert not names, names
    # inside result files (Ray's own logs say "session", so only the unambiguous words)
    inside = re.compile(r"\b(?:stop \d+|issue \d+|device calls?|s\d+call\d+)\b", re.I)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p, text in _text_files() for m in inside.finditer(text)]
    assert not hits, hits[:20]
    bad = []
    for doc in DOCS:
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            line = PROCESS_OK.sub("", line)
            bad += [f"{doc.relative_to(ROOT)}:{i}: {m.group(0)!r}" for m in PROCESS.finditer(line)]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_every_result_file_the_docs_name_exists(doc):
    text = doc.read_text()
    named = set(re.findall(r"(?:bench/)?results/[\w./{},*-]+\.(?:jsonl|json|txt|log|md|png)", text))
    missing = []
    for name in named:
        for path in _expand(name):
            if "*" in path:
                if not list(ROOT.glob(path)):
                    missing.append(path)
            elif not (ROOT / path).is_file():
                missing.append(path)
    assert not missing, sorted(missing)


def _expand(name: str) -> list[str]:
    """``a{1,2}b`` -> ``a1b``, ``a2b`` (the docs' shorthand for a group of files)."""
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [x for alt in m.group(1).split(",") for x in _expand(name[:m.start()] + alt + name[m.end():])]


def test_a_copied_job_counts_once_in_the_training_totals(tmp_path):
    from bench.real_run import run_figures

    def job(folder, log, meta):
        d = tmp_path / "run" / "adapters" / folder
        d.mkdir(parents=True)
        (d / "train_log.json").write_text(json.dumps(log))
        (d / "adapter.json").write_text(json.dumps(meta))

    rs = {"job": "expert/RS", "tokens_per_s": 1000.0, "train_seconds": 10.0, "step_tokens": [5000, 5000]}
    med = {"job": "expert/Med", "tokens_per_s": 3000.0, "train_seconds": 2.0, "step_tokens": [3000, 3000]}
    job("experts/RS", rs, {"id": "expert:RS"})
    job("experts/Med", med, {"id": "expert:Med"})
    job("lora_ft/stage-0-RS", rs, {"id": "lora_ft:stage-0", "cloned_from": "expert:RS"})  # what a copy carries
    (tmp_path / "run" / "stages").mkdir()
    fig = run_figures(tmp_path / "run", wall=100.0)
    assert [j.get("cloned_from") for j in fig["jobs"]] == [None, None, "expert:RS"]
    assert fig["train_steps_s"] == 12.0
    assert fig["train_tokens_per_s_overall"] == round(16000 / 12.0, 1)
    assert fig["train_tokens_per_s_jobs_median"] == 3000.0  # of the two trained jobs


def test_bench_results_name_paths_as_they_hold_anywhere(tmp_path, monkeypatch):
    from bench.paths import portable

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    got = portable({"args": {"out": str(tmp_path / "out" / "x.json"), "data": str(tmp_path / "runs" / "r")},
                    "cmd": [f"{tmp_path}/bench/x.py", "--work", str(tmp_path)]})
    assert got == {"args": {"out": "$OUT/x.json", "data": "runs/r"}, "cmd": ["bench/x.py", "--work", "."]}
    assert not ABSOLUTE.search(json.dumps(got))
