"""``clsvc`` commands that run workloads: ``run``, ``sweep``, ``report``, ``serve`` (Ray Serve, or ``--local``
in this process) and ``predict`` (the parser is :mod:`cl_service.cli`). Heavy imports (torch, ray, grpc) happen
inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cl_service._cli_base import CLIError


def cmd_run(a: argparse.Namespace) -> int:
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


def cmd_sweep(a: argparse.Namespace) -> int:
    from cl_service.study.orders import parse_seeds
    from cl_service.sweep.space import expand, load_base, load_space, with_seeds

    seeds = parse_seeds(a.seeds) if a.seeds else None
    space = with_seeds(load_space(a.space), seeds)  # validate before starting Ray
    trials = expand(space, load_base(a.config, a.overrides))
    if a.dry_run:
        for t in trials:
            print(f"{t.index + 1:3d} {t.id} {t.label()}")
        print(f"{len(trials)} trial(s)")
        return 0
    from cl_service.on_ray.tune import run_sweep, sweep_exit_code

    # non-zero while a trial is unfinished; 128 + the signal when SIGINT/SIGTERM interrupted it
    return sweep_exit_code(run_sweep(a.config, a.space, a.out, a.overrides, log=lambda m: print(m, flush=True),
                                     command=" ".join(["clsvc", *sys.argv[1:]]), seeds=seeds))


def cmd_report(a: argparse.Namespace) -> int:
    from cl_service.run import summary_table

    path = Path(a.out) / "metrics.json"
    if not path.is_file():
        raise CLIError(f"{path} not found: the run has not finished (rerun it with the same --out to resume)")
    metrics = json.loads(path.read_text())
    print(f"{metrics['benchmark']}: {' -> '.join(metrics['tasks'])}")
    print(summary_table(metrics))
    print(f"report: {Path(a.out).resolve() / 'report.md'}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    if a.local:
        return _serve_local(a)
    argv = [x for k in ("config", "results") if getattr(a, k) for x in (f"--{k}", getattr(a, k))]
    argv += ["--port", str(a.port)] if a.port is not None else []
    argv += ["--http-port", str(a.http_port)] if a.http_port is not None else []
    argv += ["--detach"] if a.detach else []
    argv += ["--insecure"] if a.insecure else []
    if a.host or a.tls_cert or a.tls_key or a.device or a.max_batch is not None:
        raise CLIError("--host, --tls-cert, --tls-key, --device and --max-batch need --local: Serve's gRPC proxy "
                       "binds all interfaces, without TLS; on Ray set router./expert.max_batch_size and num_gpus "
                       "(README: Serving)")
    from cl_service.on_ray.serve_start import serve_main

    return serve_main(argv + list(a.overrides), log=lambda m: print(m, flush=True))


def _serve_local(a: argparse.Namespace) -> int:
    """The same API in this process, without Ray (batched, stages overlapped, any router kind)."""
    from cl_service.serve.config import load_serve_cfg, ray_only_settings

    if a.detach:
        raise CLIError("--detach needs Ray (a --local server ends with this process)")
    extra = [f"results={Path(a.results).resolve()}"] if a.results else []
    extra += ["insecure=true"] if a.insecure else []
    if a.max_batch is not None:
        extra += [f"router.max_batch_size={a.max_batch}", f"expert.max_batch_size={a.max_batch}"]
    cfg = load_serve_cfg(a.config, list(a.overrides) + extra)
    if not a.results and not a.config:
        raise CLIError("--local needs --results (the run's results folder) or a --config naming it")
    ray_only = ray_only_settings(cfg)
    if ray_only:
        raise CLIError(f"--local serves in one process without Ray and cannot honour {', '.join(ray_only)} "
                       "(deployment layout and resources); drop them, or serve on Ray")
    if not Path(cfg.results).is_absolute():
        from cl_service.serve.config import changed

        cfg = changed(cfg, results=str(Path(cfg.results).resolve()))
    import signal
    import threading

    from cl_service.serve.service import local_server

    servicer, server, port = local_server(cfg, a.port, a.host, tls_cert=a.tls_cert, tls_key=a.tls_key,
                                          device=a.device)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"serving {cfg.results} on {a.host or '127.0.0.1'}:{port} (gRPC cl.v1{', TLS' if a.tls_cert else ''}, "
          f"router {cfg.router_kind}{', continuous batching' if cfg.continuous else ''}, no Ray; Ctrl-C stops)",
          flush=True)
    from cl_service.serve.http_server import serve_http_cli

    http = serve_http_cli(servicer, a.http_port, a.host or "127.0.0.1") if a.http_port is not None else None
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if http is not None:
            http.stop()
        server.stop(grace=10).wait(30)
        servicer.close(timeout_s=60)
    print("stopped", flush=True)
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    import os

    import grpc

    from cl_service.serve.client import Client

    token = os.environ.get(a.token_env) or None
    with Client(a.address, token=token, application=a.application, tls_ca=a.tls_ca, retries=a.retries,
                retry_deadline_s=a.retry_deadline) as c:
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
