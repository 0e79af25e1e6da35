"""``clsvc``: the command line, its parser and dispatch. The commands' bodies live in
:mod:`cl_service._cli_data` (data, base, adapters, score, ls, config), :mod:`cl_service._cli_jobs` (run, sweep,
report, serve, predict) and :mod:`cl_service._cli_study` (study); heavy imports (torch, ray) happen inside the
commands that need them, and the registries that name an option's choices are read only when a value is checked
or a help page printed."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterator, Sequence

from cl_service._cli_base import CLIError, config_classes


class _Names:
    """A registry's names as argparse ``choices`` (or, via ``%(known)s``, in a help text), read from the
    registry the first time argparse needs them: building the parser imports no registry (``data.synth`` pulls
    numpy and PIL, ``methods`` more). Options using it set ``metavar``, else ``add_argument`` would read them."""

    def __init__(self, module: str, registry: str) -> None:
        self._module, self._registry = module, registry
        self._names: list[str] | None = None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = list(getattr(importlib.import_module(self._module), self._registry).names())
        return self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __contains__(self, name: object) -> bool:
        return name in self._get()

    def __len__(self) -> int:
        return len(self._get())

    def __str__(self) -> str:
        return ", ".join(self._get())


def build_parser() -> argparse.ArgumentParser:
    from cl_service import __version__
    from cl_service import _cli_data as d, _cli_jobs as j
    from cl_service import _cli_study

    benchmarks = _Names("cl_service.data.synth", "BENCHMARKS")
    scorers = _Names("cl_service.eval.scorers", "SCORERS")
    profiles = _Names("cl_service.models.config", "PROFILES")

    p = argparse.ArgumentParser(prog="clsvc", description="cl-service: continual learning of multimodal LLMs")
    p.add_argument("--version", action="version", version=f"clsvc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ls", help="list what the registries hold: methods, benchmarks, scorers, routers, profiles")
    s.add_argument("what", choices=("methods", "benchmarks", "scorers", "routers", "profiles"))
    s.set_defaults(func=d.cmd_ls)

    cfg = sub.add_parser("config", help="every config key: type, default, meaning, resolved value").add_subparsers(
        dest="config_cmd", required=True)
    s = cfg.add_parser("show", help="the resolved config (YAML + key=value overrides), key by key with docs")
    s.add_argument("--kind", choices=("run", "serve"), default="run", help="which workload's config")
    s.add_argument("--config", default=None, help="a YAML file (workloads/configs/*.yaml)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=d.cmd_config)
    s = cfg.add_parser("reference", help="the Markdown reference of every key (docs/config.md)")
    s.add_argument("--out", default=None, help="write it here instead of printing it")
    s.set_defaults(func=d.cmd_config)

    data = sub.add_parser("data", help="task streams as Arrow shards").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="generate a built-in benchmark into shards")
    s.add_argument("--benchmark", default="dcl-mini", choices=benchmarks, metavar="BENCHMARK",
                   help="one of: %(choices)s (default %(default)s; `clsvc ls benchmarks` describes them)")
    s.add_argument("--out", required=True)
    s.add_argument("--train-per-task", type=int, default=400)
    s.add_argument("--test-per-task", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=512)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=d.cmd_synth)

    s = data.add_parser("ingest", help="ingest the official MLLM-CL release layout")
    s.add_argument("--root", required=True, help="folder holding <Task>/images, <Task>/train.json, <Task>/test.json")
    s.add_argument("--tasks", required=True, help="comma-separated task folders in stream order")
    s.add_argument("--out", required=True)
    opt = s.add_argument("--scorer", action="append", metavar="TASK=NAME",
                         help="override a task's scorer (repeatable); NAME one of: %(known)s")
    opt.known = scorers  # argparse fills %(known)s from the option's attributes
    s.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    s.add_argument("--shard-size", type=int, default=512)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=d.cmd_ingest)

    s = data.add_parser("export", help="write a dataset in the official MLLM-CL layout")
    s.add_argument("dataset")
    s.add_argument("--layout", default="mllm-cl", choices=("mllm-cl",))
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=d.cmd_export)

    s = data.add_parser("inspect", help="print the manifest as a table and verify checksums")
    s.add_argument("dataset")
    s.add_argument("--no-verify", action="store_true")
    s.set_defaults(func=d.cmd_inspect)

    s = sub.add_parser("score", help="score reference-format predictions against a test.json")
    s.add_argument("--scorer", required=True, choices=scorers, metavar="SCORER", help="one of: %(choices)s")
    s.add_argument("--annotations", required=True)
    s.add_argument("--predictions", required=True)
    s.set_defaults(func=d.cmd_score)

    base = sub.add_parser("base", help="the frozen base model").add_subparsers(dest="base_cmd", required=True)
    s = base.add_parser("build", help="pre-train the tiny base on generic data and save it in the model store")
    s.add_argument("--profile", default="tiny", choices=profiles, metavar="PROFILE",
                   help="one of: %(choices)s (default %(default)s; `clsvc ls profiles` describes them)")
    s.add_argument("--out", default=None, help="folder (default: the model store's <profile>-base)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rebuild even if a valid base exists")
    s.set_defaults(func=d.cmd_base_build)
    s = base.add_parser("assemble", help="write a llava-hf base from an LLM folder, a CLIP folder and a LLaVA "
                                         "projector (vicuna-7b-v1.5 + clip-vit-large-patch14-336 + mm_projector.bin)")
    s.add_argument("--llm", required=True, help="LlamaForCausalLM folder with its tokenizer")
    s.add_argument("--vision", required=True, help="CLIPModel or CLIPVisionModel folder with preprocessor_config.json")
    s.add_argument("--projector", required=True, help="LLaVA-1.5 stage-1 mm_projector.bin")
    s.add_argument("--out", required=True, help="the new base folder (then base.path=<it>)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.set_defaults(func=d.cmd_base_assemble)

    s = sub.add_parser("run", help="run a continual-learning stream (MR-LoRA and baselines)",
                       description="Same options as workloads/run_stream.py; training runs on Ray Train "
                                   "(RAY_ADDRESS or a local Ray on loopback) unless ray.num_workers=0.")
    s.add_argument("--config", default=None)
    s.add_argument("--data", default=None)
    opt = s.add_argument("--methods", default=None,
                         help="comma-separated methods (default: the config's) from: %(known)s")
    opt.known = _Names("cl_service.methods", "METHODS")  # not choices: a comma-separated list
    s.add_argument("--out", default=None)
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (jobs to train, copies, already trained, evaluations) and stop")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=j.cmd_run)

    s = sub.add_parser("sweep", help="Ray Tune sweep of a run's config keys (LoRA rank, router data, lr, ...)",
                       description="Same options as workloads/sweep_lora.py. Each trial is a CL run with Ray Train "
                                   "workers inside; ASHA stops weak trials after a stage; rerun with the same "
                                   "--out to finish only the missing trials.")
    s.add_argument("--config", required=True, help="RunCfg YAML, the base of every trial")
    s.add_argument("--space", required=True, help="SPACE.yaml (see cl_service/sweep/space.py)")
    s.add_argument("--out", default=None, help="sweep folder (default: the config's out + '-sweep')")
    s.add_argument("--seeds", default=None, help="N (seeds 0..N-1) or a comma-separated list: every trial runs at "
                                                 "each seed, ASHA decides on the mean (default: the space file's)")
    s.add_argument("--dry-run", action="store_true", help="list the trials and exit")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=j.cmd_sweep)

    s = sub.add_parser("study", help="a CL config over several task orders and seeds: intervals, paired tests",
                       description="Same options as workloads/run_study.py. Runs the grid of (order, seed) cells, each "
                                   "a CL run, on Ray (as many at once as the resources allow), training every job "
                                   "shared by several cells once; writes study.json and report.md. Rerun with the "
                                   "same --out to resume.")
    _cli_study.study_arguments(s)
    s.add_argument("--dry-run", action="store_true",
                   help="list the cells, the jobs to train and the jobs shared, and stop")
    s.set_defaults(func=_cli_study.cmd_study)

    s = sub.add_parser("serve", help="serve a run's experts and router over gRPC (Ray Serve, local Ray on loopback)",
                       description="Same options as workloads/serve_experts.py. Uses RAY_ADDRESS if set, else starts "
                                   "a local Ray on 127.0.0.1. Serve's gRPC proxy listens on all interfaces of the "
                                   "port: CLSVC_TOKEN (a shared token) is required unless --insecure. With --local: "
                                   "the same API in this process, without Ray, with the same serve config (any "
                                   "router_kind, continuous=true; not the Ray deployment keys). Ctrl-C stops it.")
    s.add_argument("--results", default=None, help="the run's results folder (e.g. runs/dcl-mini)")
    s.add_argument("--port", type=int, default=None, help="gRPC port (default 9000)")
    s.add_argument("--config", default=None, help="ServeCfg YAML (workloads/configs/serve_dcl_mini.yaml)")
    s.add_argument("--http-port", type=int, default=None,
                   help="OpenAI-compatible HTTP (/v1/chat/completions, /v1/models) on 127.0.0.1: Ray Serve's proxy "
                        "(default 8000, always on); --local: off unless given (0 = any free port)")
    s.add_argument("--detach", action="store_true", help="with RAY_ADDRESS: deploy and return")
    s.add_argument("--local", action="store_true",
                   help="serve in this process without Ray (on --host; $CLSVC_TOKEN required of clients when set)")
    s.add_argument("--host", default=None, help="--local: interface to bind (default 127.0.0.1)")
    s.add_argument("--insecure", action="store_true",
                   help="allow serving beyond loopback without a token (Ray Serve's proxy always binds all "
                        "interfaces); the config key insecure=true")
    s.add_argument("--tls-cert", default=None, help="--local: serve TLS with this PEM certificate (chain)")
    s.add_argument("--tls-key", default=None, help="--local: the PEM private key of --tls-cert")
    s.add_argument("--device", default=None, help="--local: where the model goes (e.g. cuda); default CPU")
    s.add_argument("--max-batch", type=int, default=None,
                   help="--local: requests per routing/answering batch (router. and expert.max_batch_size)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=j.cmd_serve)

    s = sub.add_parser("predict", help="ask a served run: an image and a question in, the routed expert's answer out")
    s.add_argument("--image", action="append", default=[], help="PNG/JPEG file (repeat for several images)")
    s.add_argument("--question", default=None)
    s.add_argument("--expert", default=None, help="answer with this expert (task name or id); skips routing")
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--address", default="127.0.0.1:9000")
    s.add_argument("--token-env", default="CLSVC_TOKEN", help="environment variable holding the shared token")
    s.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this PEM CA bundle or server certificate")
    s.add_argument("--application", default=None, help="Serve app name (only when several apps run)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt")
    s.add_argument("--retries", type=int, default=6, help="retries of a call failing UNAVAILABLE (jittered "
                   "exponential backoff from 0.2 s up to 5 s; 0 = none)")
    s.add_argument("--retry-deadline", type=float, default=30.0, help="no retry starts later than this many seconds "
                   "after the first attempt")
    s.add_argument("--list", action="store_true", help="list the served experts instead")
    s.add_argument("--json", action="store_true", help="print the whole response as JSON")
    s.set_defaults(func=j.cmd_predict)

    s = sub.add_parser("adapters", help="a run's adapters for other tools").add_subparsers(dest="adapters_cmd", required=True)
    s = s.add_parser("export", help="an expert as a plain peft folder, or merged into a llava-hf checkpoint")
    s.add_argument("run", help="the run's results folder")
    s.add_argument("--format", choices=["peft", "merged"], required=True)
    s.add_argument("--expert", default=None, help="task name or adapter id (default: every expert, into OUT/<task>)")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=d.cmd_adapters_export)

    s = sub.add_parser("report", help="print the metrics table of a finished run")
    s.add_argument("out", help="the run's results folder")
    s.set_defaults(func=j.cmd_report)
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
    # `python -m cl_service.cli`: run the imported module's main, so that it catches the CLIError that the
    # commands import from cl_service.cli (this __main__ copy has a class of its own)
    from cl_service.cli import main as _main

    sys.exit(_main())
