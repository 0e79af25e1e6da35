"""``clsvc`` commands over data and artefacts: ``data synth|ingest|export|inspect``, ``score``,
``base build|assemble``, ``adapters export``, ``ls`` and ``config`` (the parser is :mod:`cl_service.cli`).
Heavy imports (torch) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from cl_service._table import format_table
from cl_service._cli_base import CLIError, config_classes


def _progress(total: int | None, desc: str):
    from cl_service._progress import bar

    return bar(total, desc, unit="sample")


def cmd_synth(a: argparse.Namespace) -> int:
    from cl_service.data.shards import ShardWriter
    from cl_service.data.synth import BENCHMARKS

    spec = BENCHMARKS.get(a.benchmark)
    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks]
    info = {"benchmark": spec.name, "iid": spec.iid, "stream": spec.task_names, "seed": a.seed,
            "source": {"layout": "synth", "benchmark": spec.name, "train_per_task": a.train_per_task,
                       "test_per_task": a.test_per_task, "seed": a.seed}}
    total = len(spec.tasks) * (a.train_per_task + a.test_per_task)
    t0 = time.perf_counter()
    with ShardWriter(a.out, tasks, shard_size=a.shard_size, info=info, overwrite=a.overwrite) as w, \
            _progress(total, f"synth {spec.name}") as bar:
        for split, n in (("train", a.train_per_task), ("test", a.test_per_task)):
            for s in spec.generate(split, n, a.seed):
                w.add(s)
                bar.update(1)
        w.close()
    dt = time.perf_counter() - t0
    print(f"wrote {total} samples of {spec.name} to {a.out} in {dt:.1f} s ({total / max(dt, 1e-9):.0f} samples/s)")
    return _inspect(Path(a.out), verify=False)


def _parse_scorers(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, name = item.partition("=")
        if not sep or not task or not name:
            raise CLIError(f"--scorer expects TASK=NAME, got {item!r}")
        out[task] = name
    if out:
        from cl_service.eval.scorers import SCORERS

        for name in out.values():
            SCORERS.get(name)  # unknown scorer: error listing the known ones
    return out


def cmd_ingest(a: argparse.Namespace) -> int:
    from cl_service.data.ingest import ingest

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    scorers = _parse_scorers(a.scorer or [])
    t0 = time.perf_counter()
    with _progress(None, "ingest") as bar:
        last = [0]

        def tick(n: int) -> None:
            bar.update(n - last[0])
            last[0] = n

        manifest = ingest(a.root, tasks, a.out, scorers=scorers, skip_bad=a.skip_bad, shard_size=a.shard_size,
                          overwrite=a.overwrite, progress=tick)
    dt = time.perf_counter() - t0
    n = sum(sum(v.values()) for v in manifest["counts"].values())
    skipped = sum(sum(v.values()) for v in manifest["skipped"].values())
    print(f"ingested {n} samples ({skipped} bad records skipped) into {a.out} in {dt:.1f} s "
          f"({n / max(dt, 1e-9):.0f} samples/s)")
    return _inspect(Path(a.out), verify=False)


def cmd_export(a: argparse.Namespace) -> int:
    from cl_service.data.export import export_mllm_cl

    if a.layout != "mllm-cl":
        raise CLIError(f"unknown layout {a.layout!r}; known: mllm-cl")
    counts = export_mllm_cl(a.dataset, a.out, overwrite=a.overwrite)
    print(format_table(["task", "samples"], list(counts.items())))
    print(f"exported to {a.out} (official MLLM-CL layout)")
    return 0


def _inspect(root: str | Path, verify: bool) -> int:
    from cl_service.data.shards import ShardDataset

    ds = ShardDataset(root)
    m = ds.manifest
    splits = sorted({sp for c in m["counts"].values() for sp in c})
    rows = []
    for t in m["tasks"]:
        c = m["counts"].get(t["name"], {})
        sk = m["skipped"].get(t["name"], {})
        rows.append([t["name"], t["scorer"], *[c.get(sp, 0) for sp in splits], sum(sk.values()),
                     len(ds.shard_paths(t["name"])),
                     sum(s["bytes"] for s in m["shards"] if s["task"] == t["name"]) // 1024])
    print(f"dataset {root}  schema v{m['schema_version']}  "
          f"{m.get('benchmark') or m.get('source', {}).get('layout', '')}  stream: {' -> '.join(ds.tasks)}")
    print(format_table(["task", "scorer", *splits, "skipped", "shards", "KiB"], rows))
    if verify:
        problems = ds.verify()
        if problems:
            for p in problems:
                print(f"CORRUPT {p}", file=sys.stderr)
            return 1
        print(f"checksums ok ({len(m['shards'])} shards)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    return _inspect(a.dataset, verify=not a.no_verify)  # a folder or a URI (s3://bucket/ds)


def cmd_adapters_export(a: argparse.Namespace) -> int:
    from cl_service.adapters.export import export_run

    print(*export_run(a.run, a.format, a.out, a.expert, a.overwrite), sep="\n")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    from cl_service.eval.predictions import read_annotations, read_predictions
    from cl_service.eval.scorers import score_predictions

    result = score_predictions(a.scorer, read_annotations(a.annotations), read_predictions(a.predictions))
    print(json.dumps(result))
    return 0


def cmd_base_build(a: argparse.Namespace) -> int:
    import shutil

    from cl_service.models.store import base_path, build_base

    if a.force:
        target = Path(a.out or base_path(a.profile))
        # --force deletes a base this command built (its base.json), or an empty folder: never anything else.
        if target.exists() and not (target / "base.json").is_file() and any(target.iterdir()):
            print(f"error: --force would delete {target}, which is not a base built by 'clsvc base build' "
                  "(no base.json); delete it yourself or pick another --out", file=sys.stderr)
            return 2
        shutil.rmtree(target, ignore_errors=True)
    path = build_base(a.profile, out=a.out, steps=a.steps, seed=a.seed, progress=True)
    print(f"base model ready: {path}")
    return 0


def cmd_base_assemble(a: argparse.Namespace) -> int:
    from cl_service.models.assemble import assemble_base

    path = assemble_base(a.llm, a.vision, a.projector, a.out, dtype=a.dtype, force=a.force)
    print(f"assembled base ready: {path} (prompt_style auto = mllm-cl; base.path={path})")
    return 0


def _first_line(obj: object) -> str:
    """A registered object's one-line description: its summary, its docstring, or its module's docstring."""
    import sys as _sys

    doc = getattr(obj, "summary", None) or getattr(obj, "__doc__", None)
    if not doc or doc.startswith(getattr(obj, "__name__", "?") + "("):  # none, or a dataclass's signature
        doc = getattr(_sys.modules.get(getattr(obj, "__module__", "")), "__doc__", None) or ""
    line = " ".join(str(doc).strip().split("\n\n")[0].split())
    return line if len(line) <= 110 else line[:107].rsplit(" ", 1)[0] + " ..."


def cmd_ls(a: argparse.Namespace) -> int:
    """The registries' names with a one-line description each."""
    if a.what == "methods":
        from cl_service.methods import METHODS as reg
    elif a.what == "benchmarks":
        from cl_service.data.synth import BENCHMARKS as reg
    elif a.what == "scorers":
        from cl_service.eval.scorers import SCORERS as reg
    elif a.what == "routers":
        import cl_service.routers.nearest  # noqa: F401  (each router kind registers on import)
        import cl_service.routers.prototype  # noqa: F401
        import cl_service.routers.ridge  # noqa: F401
        from cl_service.routers.base import ROUTERS as reg
    else:
        from cl_service.models.config import PROFILES as reg
    for name in reg.names():
        obj = reg.get(name)
        if a.what == "profiles":
            line = (f"{obj.image_size} px / {obj.patch_size} px patches, decoder {obj.text_layers}x{obj.text_hidden}, "
                    f"vision {obj.vision_layers}x{obj.vision_hidden}, {obj.dtype}")
        else:
            line = _first_line(obj)
        print(f"{name:16s} {line}")
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    """``config show``: every key of a workload config with its type, default, docstring and resolved value;
    ``config reference``: the Markdown reference of every key (``docs/config.md``)."""
    from cl_service import _cfgdoc, _cfgload

    classes = config_classes()
    if a.config_cmd == "reference":
        text = _cfgdoc.reference({"clsvc run / sweep (RunCfg)": classes["run"], "clsvc serve (ServeCfg)": classes["serve"]})
        if a.out:
            from cl_service._atomic import atomic_write_text

            atomic_write_text(a.out, text + "\n")
        else:
            print(text)
        return 0
    cls = classes[a.kind]
    cfg = _cfgload.load(cls, a.config, a.overrides)
    print(_cfgdoc.show(cls, cfg))
    return 0
