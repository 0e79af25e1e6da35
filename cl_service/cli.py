"""``clsvc``: the command line. Heavy imports (torch, ray) happen inside the subcommands that need them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from cl_service._table import format_table


class CLIError(Exception):
    """An error the user can fix; printed without a trace."""


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=None)


# ----------------------------------------------------------------------------------------------- data
def _cmd_synth(a: argparse.Namespace) -> int:
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


def _cmd_ingest(a: argparse.Namespace) -> int:
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


def _cmd_export(a: argparse.Namespace) -> int:
    from cl_service.data.export import export_mllm_cl

    if a.layout != "mllm-cl":
        raise CLIError(f"unknown layout {a.layout!r}; known: mllm-cl")
    counts = export_mllm_cl(a.dataset, a.out, overwrite=a.overwrite)
    print(format_table(["task", "samples"], list(counts.items())))
    print(f"exported to {a.out} (official MLLM-CL layout)")
    return 0


def _inspect(root: Path, verify: bool) -> int:
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


def _cmd_inspect(a: argparse.Namespace) -> int:
    return _inspect(Path(a.dataset), verify=not a.no_verify)


# ---------------------------------------------------------------------------------------------- score
def _cmd_score(a: argparse.Namespace) -> int:
    from cl_service.eval.predictions import read_annotations, read_predictions
    from cl_service.eval.scorers import score_predictions

    result = score_predictions(a.scorer, read_annotations(a.annotations), read_predictions(a.predictions))
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------- base
def _cmd_base_build(a: argparse.Namespace) -> int:
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


def _cmd_base_assemble(a: argparse.Namespace) -> int:
    from cl_service.models.assemble import assemble_base

    path = assemble_base(a.llm, a.vision, a.projector, a.out, dtype=a.dtype, force=a.force)
    print(f"assembled base ready: {path} (prompt_style auto = mllm-cl; base.path={path})")
    return 0


# ------------------------------------------------------------------------------------------------ run
def _cmd_run(a: argparse.Namespace) -> int:
    from cl_service.on_ray.stream import parse_args, run

    argv = [x for k in ("config", "data", "methods", "out") if getattr(a, k) for x in (f"--{k}", getattr(a, k))]
    cfg, _ = parse_args(argv + list(a.overrides))
    if a.dry_run:
        from cl_service.run import plan_stream

        for st in plan_stream(cfg):
            print(f"stage {st['stage'] + 1} {st['task']}:")
            for what in ("train", "copies", "trained", "evaluate"):
                label = {"train": "train", "copies": "copy of an identical job", "trained": "already trained",
                         "evaluate": "evaluate"}[what]
                print(f"  {label:26s} {', '.join(st[what]) or '-'}")
        return 0
    run(cfg, log=lambda m: print(m, flush=True))
    return 0


def _cmd_sweep(a: argparse.Namespace) -> int:
    from cl_service.sweep.space import expand, load_base, load_space

    space = load_space(a.space)  # validate before starting Ray
    trials = expand(space, load_base(a.config, a.overrides))
    if a.dry_run:
        for t in trials:
            print(f"{t.index + 1:3d} {t.id} {t.label()}")
        print(f"{len(trials)} trial(s)")
        return 0
    from cl_service.on_ray.tune import run_sweep

    run_sweep(a.config, a.space, a.out, a.overrides, log=lambda m: print(m, flush=True),
              command=" ".join(["clsvc", *sys.argv[1:]]))
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from cl_service.run import summary_table

    path = Path(a.out) / "metrics.json"
    if not path.is_file():
        raise CLIError(f"{path} not found: the run has not finished (rerun it with the same --out to resume)")
    metrics = json.loads(path.read_text())
    print(f"{metrics['benchmark']}: {' -> '.join(metrics['tasks'])}")
    print(summary_table(metrics))
    print(f"report: {Path(a.out).resolve() / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------------------------- serve
def _cmd_serve(a: argparse.Namespace) -> int:
    if a.local:
        return _serve_local(a)
    argv = [x for k in ("config", "results") if getattr(a, k) for x in (f"--{k}", getattr(a, k))]
    argv += ["--port", str(a.port)] if a.port is not None else []
    argv += ["--detach"] if a.detach else []
    from cl_service.on_ray.serve import serve_main

    return serve_main(argv + list(a.overrides), log=lambda m: print(m, flush=True))


def _serve_local(a: argparse.Namespace) -> int:
    """The same gRPC API in this process, without Ray, on 127.0.0.1 (batched, stages overlapped)."""
    if not a.results:
        raise CLIError("--local needs --results (the run's results folder)")
    if a.config or a.overrides or a.detach:
        raise CLIError("--local takes --results, --port, --device and --max-batch only (no Ray Serve config)")
    import signal
    import threading

    from cl_service.serve.service import ContinualLearningServicer, build_server

    servicer = ContinualLearningServicer(a.results, device=a.device, max_batch=a.max_batch)
    server, port = build_server(servicer, 9000 if a.port is None else a.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"serving {a.results} on 127.0.0.1:{port} (gRPC cl.v1, no Ray; Ctrl-C stops)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=10).wait(30)
        servicer.close(timeout_s=60)
    print("stopped", flush=True)
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    import os

    import grpc

    from cl_service.serve.client import Client

    token = os.environ.get(a.token_env) or None
    with Client(a.address, token=token, application=a.application) as c:
        try:
            if a.list:
                for e in c.list_experts(timeout=a.timeout).experts:
                    print(f"{e.task}\t{e.id}\tv{e.adapter_version}\t{e.description}")
                return 0
            if not a.image or a.question is None:
                raise CLIError("--image and --question are required (or --list)")
            images = []
            for f in a.image:
                p = Path(f)
                if not p.is_file():
                    raise CLIError(f"image {f} not found")
                images.append(p.read_bytes())
            r = c.predict(images, a.question, expert=a.expert, max_new_tokens=a.max_new_tokens, timeout=a.timeout)
        except grpc.RpcError as e:
            print(f"clsvc: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if a.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))
    else:
        print(r.answer)
        how = r.router.kind + (f" (router said {r.router.raw_output!r}{', fallback' if r.router.fallback_used else ''})"
                               if r.router.raw_output else "")
        print(f"expert {r.expert} via {how}; {r.latency.route_ms:.0f} ms route + {r.latency.answer_ms:.0f} ms answer, "
              f"{r.latency.total_ms:.0f} ms total", file=sys.stderr)
    return 0


def _first_line(obj: object) -> str:
    """A registered object's one-line description: its summary, its docstring, or its module's docstring."""
    import sys as _sys

    doc = getattr(obj, "summary", None) or getattr(obj, "__doc__", None)
    if not doc or doc.startswith(getattr(obj, "__name__", "?") + "("):  # none, or a dataclass's signature
        doc = getattr(_sys.modules.get(getattr(obj, "__module__", "")), "__doc__", None) or ""
    line = " ".join(str(doc).strip().split("\n\n")[0].split())
    return line if len(line) <= 110 else line[:107].rsplit(" ", 1)[0] + " ..."


def _cmd_ls(a: argparse.Namespace) -> int:
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


def _config_classes() -> dict[str, type]:
    from cl_service.config import RunCfg
    from cl_service.serve.config import ServeCfg

    return {"run": RunCfg, "serve": ServeCfg}


def _cmd_config(a: argparse.Namespace) -> int:
    """``config show``: every key of a workload config with its type, default, docstring and resolved value;
    ``config reference``: the Markdown reference of every key (``docs/config.md``)."""
    from cl_service import _cfgdoc, _cfgload

    classes = _config_classes()
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


def build_parser() -> argparse.ArgumentParser:
    from cl_service import __version__

    p = argparse.ArgumentParser(prog="clsvc", description="cl-service: continual learning of multimodal LLMs")
    p.add_argument("--version", action="version", version=f"clsvc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ls", help="list what the registries hold: methods, benchmarks, scorers, routers, profiles")
    s.add_argument("what", choices=("methods", "benchmarks", "scorers", "routers", "profiles"))
    s.set_defaults(func=_cmd_ls)

    cfg = sub.add_parser("config", help="every config key: type, default, meaning, resolved value").add_subparsers(
        dest="config_cmd", required=True)
    s = cfg.add_parser("show", help="the resolved config (YAML + key=value overrides), key by key with docs")
    s.add_argument("--kind", choices=("run", "serve"), default="run", help="which workload's config")
    s.add_argument("--config", default=None, help="a YAML file (workloads/configs/*.yaml)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_config)
    s = cfg.add_parser("reference", help="the Markdown reference of every key (docs/config.md)")
    s.add_argument("--out", default=None, help="write it here instead of printing it")
    s.set_defaults(func=_cmd_config)

    data = sub.add_parser("data", help="task streams as Arrow shards").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="generate a built-in benchmark into shards")
    s.add_argument("--benchmark", default="dcl-mini")
    s.add_argument("--out", required=True)
    s.add_argument("--train-per-task", type=int, default=400)
    s.add_argument("--test-per-task", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=512)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_synth)

    s = data.add_parser("ingest", help="ingest the official MLLM-CL release layout")
    s.add_argument("--root", required=True, help="folder holding <Task>/images, <Task>/train.json, <Task>/test.json")
    s.add_argument("--tasks", required=True, help="comma-separated task folders in stream order")
    s.add_argument("--out", required=True)
    s.add_argument("--scorer", action="append", metavar="TASK=NAME", help="override a task's scorer (repeatable)")
    s.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    s.add_argument("--shard-size", type=int, default=512)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_ingest)

    s = data.add_parser("export", help="write a dataset in the official MLLM-CL layout")
    s.add_argument("dataset")
    s.add_argument("--layout", default="mllm-cl")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_export)

    s = data.add_parser("inspect", help="print the manifest as a table and verify checksums")
    s.add_argument("dataset")
    s.add_argument("--no-verify", action="store_true")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("score", help="score reference-format predictions against a test.json")
    s.add_argument("--scorer", required=True)
    s.add_argument("--annotations", required=True)
    s.add_argument("--predictions", required=True)
    s.set_defaults(func=_cmd_score)

    base = sub.add_parser("base", help="the frozen base model").add_subparsers(dest="base_cmd", required=True)
    s = base.add_parser("build", help="pre-train the tiny base on generic data and save it in the model store")
    s.add_argument("--profile", default="tiny")
    s.add_argument("--out", default=None, help="folder (default: the model store's <profile>-base)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rebuild even if a valid base exists")
    s.set_defaults(func=_cmd_base_build)
    s = base.add_parser("assemble", help="write a llava-hf base from an LLM folder, a CLIP folder and a LLaVA "
                                         "projector (vicuna-7b-v1.5 + clip-vit-large-patch14-336 + mm_projector.bin)")
    s.add_argument("--llm", required=True, help="LlamaForCausalLM folder with its tokenizer")
    s.add_argument("--vision", required=True, help="CLIPModel or CLIPVisionModel folder with preprocessor_config.json")
    s.add_argument("--projector", required=True, help="LLaVA-1.5 stage-1 mm_projector.bin")
    s.add_argument("--out", required=True, help="the new base folder (then base.path=<it>)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.set_defaults(func=_cmd_base_assemble)

    s = sub.add_parser("run", help="run a continual-learning stream (MR-LoRA and baselines)",
                       description="Same options as workloads/run_stream.py; training runs on Ray Train "
                                   "(RAY_ADDRESS or a local Ray on loopback) unless ray.num_workers=0.")
    s.add_argument("--config", default=None)
    s.add_argument("--data", default=None)
    s.add_argument("--methods", default=None)
    s.add_argument("--out", default=None)
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (jobs to train, copies, already trained, evaluations) and stop")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("sweep", help="Ray Tune sweep of a run's config keys (LoRA rank, router data, lr, ...)",
                       description="Same options as workloads/sweep_lora.py. Each trial is a CL run with Ray Train "
                                   "workers inside; ASHA stops weak trials after a stage; rerun with the same "
                                   "--out to finish only the missing trials.")
    s.add_argument("--config", required=True, help="RunCfg YAML, the base of every trial")
    s.add_argument("--space", required=True, help="SPACE.yaml (see cl_service/sweep/space.py)")
    s.add_argument("--out", default=None, help="sweep folder (default: the config's out + '-sweep')")
    s.add_argument("--dry-run", action="store_true", help="list the trials and exit")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("serve", help="serve a run's experts and router over gRPC (Ray Serve, local Ray on loopback)",
                       description="Same options as workloads/serve_experts.py. Uses RAY_ADDRESS if set, else starts "
                                   "a local Ray on 127.0.0.1. Serve's gRPC proxy listens on all interfaces of the "
                                   "port; set CLSVC_TOKEN to require a shared token. Ctrl-C stops it.")
    s.add_argument("--results", default=None, help="the run's results folder (e.g. runs/dcl-mini)")
    s.add_argument("--port", type=int, default=None, help="gRPC port (default 9000)")
    s.add_argument("--config", default=None, help="ServeCfg YAML (workloads/configs/serve_dcl_mini.yaml)")
    s.add_argument("--detach", action="store_true", help="with RAY_ADDRESS: deploy and return")
    s.add_argument("--local", action="store_true",
                   help="serve in this process without Ray, on 127.0.0.1 (no token check: loopback only)")
    s.add_argument("--device", default=None, help="--local: where the model goes (e.g. cuda); default CPU")
    s.add_argument("--max-batch", type=int, default=16, help="--local: requests per routing/answering batch")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("predict", help="ask a served run: an image and a question in, the routed expert's answer out")
    s.add_argument("--image", action="append", default=[], help="PNG/JPEG file (repeat for several images)")
    s.add_argument("--question", default=None)
    s.add_argument("--expert", default=None, help="answer with this expert (task name or id); skips routing")
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--address", default="127.0.0.1:9000")
    s.add_argument("--token-env", default="CLSVC_TOKEN", help="environment variable holding the shared token")
    s.add_argument("--application", default=None, help="Serve app name (only when several apps run)")
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--list", action="store_true", help="list the served experts instead")
    s.add_argument("--json", action="store_true", help="print the whole response as JSON")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("report", help="print the metrics table of a finished run")
    s.add_argument("out", help="the run's results folder")
    s.set_defaults(func=_cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cl_service.data.ingest import IngestError
    from cl_service.data.shards import DatasetError
    from cl_service._cfgload import ConfigError
    from cl_service.adapters.registry import AdapterError
    from cl_service.registry import UnknownName

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, AdapterError, IngestError, DatasetError, UnknownName, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"clsvc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clsvc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
