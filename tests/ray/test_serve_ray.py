"""Real gRPC round trips through Ray Serve's gRPC proxy on a tiny 2-task run (RS, Med), then a hot add (AD).

One module-scoped app: Ingress + Router + Expert with fractional CPUs, a shared token, a 200 kB image limit. Two
more apps beside it for what the first cannot show: a feature router in the Router deployment (prototype), and
both stages in one replica with continuous batching (colocate, knn). Every app answers concurrent requests, and
the answers are compared with the run's offline evaluation.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.timeout(240)

TOKEN = "test-secret-token"
RUN_OVERRIDES = ["methods=[mrlora,mrlora_proto,mrlora_knn]", "expert.train.max_steps=2", "expert.train.batch_size=4",
                 "router.train.max_steps=2", "router.samples_per_task=4", "expert.lora.rank=4", "router.lora.rank=4",
                 "eval.max_new_tokens=3", "ray.num_workers=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Paused(Exception):
    pass


def _pause_after(stage: int):
    def hook(info: dict) -> None:
        if info["stage"] == stage:
            raise _Paused  # the run is "still going": later stages come with the hot-add test

    return hook


def _run(out: Path, tiny_base, dcl_shards, tasks: str = "RS,Med,AD", pause_after: int | None = None) -> None:
    import torch

    from cl_service.config import load_run_cfg
    from cl_service.run import LocalTrainer, run_stream

    torch.set_num_threads(1)
    cfg = load_run_cfg(None, [f"out={out}", f"data.path={dcl_shards}", f"base.path={tiny_base}",
                              f"data.tasks=[{tasks}]", *RUN_OVERRIDES])
    try:
        run_stream(cfg, LocalTrainer(), log=lambda *_: None,
                   on_stage=_pause_after(pause_after) if pause_after is not None else None)
    except _Paused:
        pass


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory, tiny_base, dcl_shards):
    from ray import serve

    from cl_service.on_ray import serve as clserve, serve_start
    from cl_service.serve.client import Client
    from cl_service.serve.config import load_serve_cfg

    out = tmp_path_factory.mktemp("served-run")
    _run(out, tiny_base, dcl_shards, pause_after=1)  # RS and Med done, AD not yet
    port = _free_port()
    cfg = load_serve_cfg(None, [
        f"results={out}", f"grpc_port={port}", f"http_port={_free_port()}", "watch_s=0.5",
        "router.num_cpus=0.2", "expert.num_cpus=0.2", "ingress_num_cpus=0.05",
        "router.batch_wait_ms=20", "expert.batch_wait_ms=20", "limits.max_image_bytes=200000"])
    serve_start.start(cfg, token=TOKEN, timeout_s=150)
    client = Client(f"127.0.0.1:{port}", token=TOKEN, application=cfg.app_name)
    client.wait_ready(30)
    yield {"out": out, "cfg": cfg, "client": client, "port": port, "shards": dcl_shards, "base": tiny_base}
    client.close()
    serve.shutdown()


def _samples(shards, task):
    from cl_service.data.shards import ShardDataset

    return list(ShardDataset(shards).iter_samples(task, "test"))


def _offline(out: Path, stage: str, task: str, method: str = "mrlora") -> dict[str, dict]:
    lines = (out / "predictions" / method / stage / f"{task}.jsonl").read_text().splitlines()
    return {r["question_id"]: r for r in map(json.loads, lines)}


def test_health_and_reflection_through_the_proxy(app):
    c = app["client"]
    assert c.health("") == "SERVING"
    assert c.health("cl.v1.ContinualLearning") == "SERVING"
    with pytest.raises(grpc.RpcError) as ei:
        c.health("no.such.Service")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = ProtoReflectionDescriptorDatabase(c.channel).get_services()
    assert "cl.v1.ContinualLearning" in services and "grpc.health.v1.Health" in services


def test_list_experts_in_stream_order(app):
    r = app["client"].list_experts()
    assert [e.task for e in r.experts] == ["RS", "Med"]
    assert [e.id for e in r.experts] == ["expert:RS", "expert:Med"]
    assert all(e.description and e.adapter_version >= 1 for e in r.experts)


def test_live_answers_equal_offline_evaluation_and_batch(app):
    """12 concurrent requests: routes and answers equal the run's own stage-1 predictions, in batches > 1."""
    from ray import serve

    items = [(t, s) for t in ("RS", "Med") for s in _samples(app["shards"], t)]
    with ThreadPoolExecutor(len(items)) as pool:
        live = list(pool.map(lambda ts: app["client"].predict(ts[1].images, ts[1].question, timeout=60), items))
    offline = {t: _offline(app["out"], "stage-1-Med", t) for t in ("RS", "Med")}
    for (t, s), r in zip(items, live):
        ref = offline[t][s.id]
        assert (r.answer, r.expert, r.router.raw_output) == (ref["text"], ref["metadata"]["expert"],
                                                              ref["metadata"]["router_raw"]), s.id
        assert r.router.kind == "mllm" and r.latency.total_ms >= r.latency.answer_ms > 0
    sizes = serve.get_deployment_handle("Expert", app["cfg"].app_name).batch_sizes.remote().result(timeout_s=30)
    assert max(sizes) > 1  # requests of different clients shared a forward pass


def _second_app(app, name: str, **changes):
    """Another app on the running Serve (the same token: Serve's gRPC proxy checks it for every app)."""
    from ray import serve

    from cl_service.on_ray import serve as clserve, serve_start

    cfg = serve_start.override(app["cfg"], app_name=name, route_prefix=f"/{name}", **changes)
    serve.run_many([serve.RunTarget(target=clserve.build(cfg, TOKEN), name=cfg.app_name,
                                    route_prefix=cfg.route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    serve_start.wait_running(cfg.app_name, 120)
    return cfg


def _concurrently(app, cfg, items):
    """``items`` ((task, sample) pairs) sent all at once to ``cfg``'s app; the responses in order."""
    from cl_service.serve.client import Client

    with Client(f"127.0.0.1:{app['port']}", token=TOKEN, application=cfg.app_name) as c, \
            ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(lambda ts: c.predict(ts[1].images, ts[1].question, timeout=90), items))


def test_a_feature_router_in_the_router_deployment_routes_as_the_offline_evaluation(app):
    """A second app with ``router_kind=prototype``: the run's saved prototype router in the Router deployment;
    concurrent requests get the routes and answers of the offline evaluation of ``mrlora_proto``."""
    from ray import serve

    cfg = _second_app(app, "clsvc-proto", router_kind="prototype")
    try:
        items = [(t, s) for t in ("RS", "Med") for s in _samples(app["shards"], t)]
        for (t, s), r in zip(items, _concurrently(app, cfg, items)):
            ref = _offline(app["out"], "stage-1-Med", t, "mrlora_proto")[s.id]
            assert (r.answer, r.expert, r.router.kind) == (ref["text"], ref["metadata"]["expert"], "prototype")
        sizes = [n for *_, n in serve.get_deployment_handle("Router", cfg.app_name).batch_log.remote().result(
            timeout_s=30)]
        assert max(sizes) > 1  # the concurrent requests were routed together
    finally:
        serve.delete(cfg.app_name)


def test_colocated_stages_with_continuous_batching_answer_as_the_offline_evaluation(app):
    """``colocate=true`` with ``continuous=true`` and the knn router: one Stages replica (one base) runs both
    stages, stage two with continuous batching. Twelve concurrent requests, so the stages overlap (stage one
    routes while rows decode) and rows join a running decode: routes and answers equal the offline evaluation of
    ``mrlora_knn``. A streamed HTTP answer through Serve's HTTP proxy comes from the running decode too."""
    import base64

    import openai
    from ray import serve

    # routing batches of 2: stage one works through the twelve requests while stage two answers the first ones
    cfg = _second_app(app, "clsvc-colo", colocate=True, continuous=True, router_kind="knn", router__max_batch_size=2)
    try:
        deployments = serve.status().applications[cfg.app_name].deployments
        assert set(deployments) == {"Ingress", "Stages"}
        items = [(t, s) for t in ("RS", "Med") for s in _samples(app["shards"], t)]
        for (t, s), r in zip(items, _concurrently(app, cfg, items)):
            ref = _offline(app["out"], "stage-1-Med", t, "mrlora_knn")[s.id]
            assert (r.answer, r.expert, r.router.kind) == (ref["text"], ref["metadata"]["expert"], "knn"), s.id
        h = serve.get_deployment_handle("Stages", cfg.app_name)
        routed = h.batch_log.remote("Router").result(timeout_s=30)
        prefills = h.batch_log.remote("Expert").result(timeout_s=30)
        steps = h.step_log.remote().result(timeout_s=30)
        assert sum(n for *_, n in routed) == len(items) and sum(n for *_, n in prefills) == len(items)
        # the stages overlapped: a routing batch ran while stage two prefilled or decoded rows
        assert any(a < d and c < b for a, b, _ in routed for c, d, _ in prefills + steps), (routed, prefills, steps)
        oc = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.http_port}/{cfg.app_name}/v1", api_key=TOKEN,
                           max_retries=0, timeout=60)
        t, s = items[0]
        url = "data:image/png;base64," + base64.b64encode(s.images[0]).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": s.question}]}]
        chunks = list(oc.chat.completions.create(model="auto", messages=msgs, stream=True))
        ref = _offline(app["out"], "stage-1-Med", t, "mrlora_knn")[s.id]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
        assert {c.model for c in chunks} == {ref["metadata"]["expert"]}
    finally:
        serve.delete(cfg.app_name)


def test_named_expert_skips_routing(app):
    s = _samples(app["shards"], "Med")[0]
    r = app["client"].predict(s.images, s.question, expert="expert:Med", max_new_tokens=1)
    assert r.expert == "Med" and r.router.kind == "request" and r.latency.route_ms == 0


def _noise_png(size: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kw,code,needle", [
    ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "at least one image"),
    ({"images": [b""]}, grpc.StatusCode.INVALID_ARGUMENT, "empty bytes"),
    ({"images": [b"definitely not an image"]}, grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image"),
    ({"images": "BIG"}, grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 200000"),
    ({"question": "  \n"}, grpc.StatusCode.INVALID_ARGUMENT, "question: must not be empty"),
    ({"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: 0 is outside [1, 256]"),
    ({"max_new_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"expert": "Nope"}, grpc.StatusCode.NOT_FOUND, "unknown expert 'Nope'; known experts: RS, Med"),
])
def test_bad_input_is_refused_clearly_and_the_server_keeps_serving(app, kw, code, needle):
    s = _samples(app["shards"], "RS")[0]
    args = {"images": s.images, "question": s.question, **kw}
    if args["images"] == "BIG":
        args["images"] = [_noise_png(300)]  # ~270 kB > the 200 kB limit
    with pytest.raises(grpc.RpcError) as ei:
        app["client"].predict(**args, timeout=30)
    assert ei.value.code() == code
    assert needle in ei.value.details() and "Traceback" not in ei.value.details()
    assert app["client"].predict(s.images, s.question, expert="RS", timeout=30).expert == "RS"


def test_shared_token_is_required(app):
    from cl_service.serve.client import Client, pb2

    s = _samples(app["shards"], "RS")[0]
    for token in (None, "wrong"):
        with Client(f"127.0.0.1:{app['port']}", token=token, application=app["cfg"].app_name) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.predict(s.images, s.question, timeout=30)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in ei.value.details()
            with pytest.raises(grpc.RpcError) as ei:
                c.list_experts()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"  # probes need no token
    with Client(f"127.0.0.1:{app['port']}") as c:
        r = c.stub.ListExperts(pb2.ListExpertsRequest(), timeout=30,
                               metadata=[("x-clsvc-token", TOKEN), ("application", app["cfg"].app_name)])
        assert len(r.experts) == 2


def test_openai_compatible_http_through_serves_http_proxy(app):
    """``/v1/chat/completions`` and ``/v1/models`` under the app's route prefix, on Serve's HTTP proxy (127.0.0.1):
    the real ``openai`` client gets the gRPC answers and usage, streamed (``stream=True``: the pieces add up to the
    answer) or whole; token, unknown expert, oversized image, a refused field and deeply nested JSON are refused
    in OpenAI's error shape."""
    import base64
    import urllib.error
    import urllib.request

    import openai
    base = f"http://127.0.0.1:{app['cfg'].http_port}{app['cfg'].route_prefix}/v1"
    oc = openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0, timeout=60)

    def msgs(images, question):
        return [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
              for i in images), {"type": "text", "text": question}]}]

    assert [m.id for m in oc.models.list().data] == ["auto", "RS", "Med"]
    for s, model in [(_samples(app["shards"], "RS")[0], "auto"), (_samples(app["shards"], "Med")[1], "Med")]:
        c = oc.chat.completions.create(model=model, messages=msgs(s.images, s.question), max_tokens=2)
        g = app["client"].predict(s.images, s.question, expert=None if model == "auto" else model, max_new_tokens=2)
        assert (c.choices[0].message.content, c.model) == (g.answer, g.expert)
        assert c.model_extra["clsvc"]["router"]["raw_output"] == g.router.raw_output
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (g.usage.prompt_tokens, g.usage.completion_tokens)
        chunks = list(oc.chat.completions.create(model=model, messages=msgs(s.images, s.question), stream=True,
                                                 stream_options={"include_usage": True}))
        assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == \
            oc.chat.completions.create(model=model, messages=msgs(s.images, s.question)).choices[0].message.content
        assert {x.model for x in chunks} == {g.expert} and chunks[-1].usage.prompt_tokens == g.usage.prompt_tokens
    s = _samples(app["shards"], "RS")[0]
    good = {"model": "auto", "messages": msgs(s.images, s.question)}
    for token, body, status in [(None, good, 401), ("wrong", good, 401), (TOKEN, {**good, "model": "Nope"}, 404),
                                (TOKEN, {**good, "messages": msgs([_noise_png(300)], s.question)}, 413),
                                (TOKEN, {**good, "temperature": 0.8}, 400),
                                (TOKEN, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400)]:
        req = urllib.request.Request(base + "/chat/completions", method="POST", data=body if isinstance(
            body, bytes) else json.dumps(body).encode(), headers={
            "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=60)
        err = json.loads(ei.value.read())["error"]
        assert ei.value.code == status and err["message"] and "Traceback" not in err["message"], err


def test_hot_add_publishes_the_next_task_without_downtime(app):
    """The run continues with AD while clients keep calling; the new expert and router go live, nothing fails."""
    c = app["client"]
    rs, ad = _samples(app["shards"], "RS"), _samples(app["shards"], "AD")
    errors: list[str] = []
    spans: list[tuple[float, float]] = []  # (start, end) of every successful request
    done = threading.Event()

    def traffic():
        i = 0
        while not done.is_set():
            s = rs[i % len(rs)]
            t0 = time.monotonic()
            try:
                c.predict(s.images, s.question, timeout=90)
                spans.append((t0, time.monotonic()))
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")
            i += 1

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    live = None
    try:
        _run(app["out"], app["base"], app["shards"])  # resumes: trains AD + the stage-2 router, publishes them
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if [e.task for e in c.list_experts().experts] == ["RS", "Med", "AD"]:
                live = time.monotonic()
                break
            time.sleep(0.25)
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    assert live is not None, "AD was not published to the running app within 60 s"
    assert not errors, errors[:3]
    assert spans and not any(t.is_alive() for t in threads)
    # requests in flight when the new catalog went live finished fine
    assert any(start < live < end for start, end in spans)
    offline = _offline(app["out"], "stage-2-AD", "AD")
    for s in ad:
        r = c.predict(s.images, s.question, timeout=60)
        ref = offline[s.id]
        assert (r.answer, r.expert, r.router.raw_output) == (ref["text"], ref["metadata"]["expert"],
                                                              ref["metadata"]["router_raw"]), s.id
    assert c.predict(ad[0].images, ad[0].question, expert="AD").expert == "AD"


def test_a_request_over_the_token_budget_fails_alone_through_router_and_expert(app):
    """Through the deployments: four images and 256 answer tokens do not fit the 320 positions of the test base;
    the Expert refuses that row (INVALID_ARGUMENT, crossing Ray as itself), the seven valid requests sent with it
    are answered as they are alone."""
    c = app["client"]
    rs, med = _samples(app["shards"], "RS"), _samples(app["shards"], "Med")
    valid = [(rs[i], "RS" if i % 2 else None) for i in range(4)] + [(med[i], None) for i in range(3)]
    alone = [c.predict(s.images, s.question, expert=e, timeout=60) for s, e in valid]
    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(c.predict, s.images, s.question, expert=e, timeout=90) for s, e in valid]
        bad = ex.submit(c.predict, list(rs[0].images) * 4, rs[0].question, max_new_tokens=256, timeout=90)
        together = [f.result() for f in futs]
        with pytest.raises(grpc.RpcError) as ei:
            bad.result()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert "4 image(s) x 16 image tokens" in ei.value.details() and "max_length of 320" in ei.value.details()
    assert [(r.answer, r.expert) for r in together] == [(r.answer, r.expert) for r in alone]


def test_the_proxy_refuses_a_message_over_the_limits_unread(app):
    """Serve's gRPC proxy takes its message limit from cfg.limits (set through the controller's runtime env)."""
    from cl_service.serve.security import grpc_message_limit

    c, s = app["client"], _samples(app["shards"], "RS")[0]
    limit = grpc_message_limit(app["cfg"].limits)
    with pytest.raises(grpc.RpcError) as ei:
        c.predict([b"x" * (limit + 1)], s.question, timeout=30)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value.details()
    assert c.predict(s.images, s.question, expert="RS", timeout=30).expert == "RS"


def test_an_unauthenticated_huge_message_is_refused_in_the_proxy_before_any_work(app):
    """The most a caller may send (every image valid and just under the 200 kB limit, as many as allowed) without
    the token: Serve's gRPC proxy refuses it (UNAUTHENTICATED) before parsing it, so the ingress never sees the
    call and decodes no image; the same message with the token is decoded there, image by image."""
    from ray import serve

    from cl_service.serve.client import Client

    limits, s = app["cfg"].limits, _samples(app["shards"], "RS")[0]
    images = [_noise_png(250, seed) for seed in range(limits.max_images)]
    assert sum(map(len, images)) > 0.9 * limits.max_images * limits.max_image_bytes
    ingress = serve.get_deployment_handle("Ingress", app["cfg"].app_name)
    before = ingress.info.remote().result(timeout_s=30)
    for token in (None, "wrong"):
        with Client(f"127.0.0.1:{app['port']}", token=token, application=app["cfg"].app_name) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.predict(images, s.question, timeout=30)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in ei.value.details()
            raw = c.channel.unary_unary("/cl.v1.ContinualLearning/Predict", request_serializer=None,
                                        response_deserializer=None)
            with pytest.raises(grpc.RpcError) as ei:  # the proxy parses nothing it has not authenticated
                raw(b"\xff\xff not protobuf", timeout=30, metadata=c.metadata)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = ingress.info.remote().result(timeout_s=30)
    assert (after["calls"], after["images_decoded"]) == (before["calls"], before["images_decoded"])  # not even seen
    r = app["client"].predict(images, s.question, expert="RS", timeout=60)
    assert r.expert == "RS"
    done = ingress.info.remote().result(timeout_s=30)
    assert done["images_decoded"] == before["images_decoded"] + len(images) and done["calls"] == before["calls"] + 1
    with Client(f"127.0.0.1:{app['port']}") as c:  # with the token, bytes that do not parse: INVALID_ARGUMENT
        raw = c.channel.unary_unary("/cl.v1.ContinualLearning/Predict", request_serializer=None,
                                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            raw(b"\xff\xff not protobuf", timeout=30, metadata=[("x-clsvc-token", TOKEN),
                                                                 ("application", app["cfg"].app_name)])
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in ei.value.details()


def test_an_app_without_a_token_is_refused_unless_the_config_says_insecure(app, monkeypatch):
    """``serve deploy workloads/configs/serve_deploy.yaml`` builds the app with ``build_app`` in the cluster: with
    no token in its environment it is refused (Serve's gRPC proxy listens on all interfaces) unless the config
    says ``insecure: true``; with the token it builds."""
    import yaml

    from cl_service.on_ray.serve import build_app
    from cl_service.serve.security import InsecureExposure

    deploy = yaml.safe_load(Path("workloads/configs/serve_deploy.yaml").read_text())
    args = {**deploy["applications"][0]["args"], "config": str(Path("workloads/configs/serve_dcl_mini.yaml").resolve()),
            "results": str(app["out"])}
    monkeypatch.delenv("CLSVC_TOKEN", raising=False)
    with pytest.raises(InsecureExposure, match="insecure"):
        build_app(args)
    assert build_app({**args, "overrides": [*args.get("overrides", []), "insecure=true"]}) is not None
    monkeypatch.setenv("CLSVC_TOKEN", "s3cret")
    assert build_app(args) is not None


def test_clsvc_serve_refuses_to_start_without_a_token_unless_insecure(app):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("CLSVC_TOKEN", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-m", "cl_service.cli", "serve", "--results", str(app["out"]), "--port",
                          str(_free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "without a token" in out.stderr and "--insecure" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def _live_replica(app_name: str, deployment: str, timeout: float = 30.0):
    """The actor handle of a live replica of ``deployment``: Serve names its replica actors
    ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace ``serve`` (no dashboard needed, unlike ray.util.state)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith(prefix):
                try:
                    return ray.get_actor(a["name"], namespace=a["namespace"])
                except ValueError:  # gone meanwhile
                    pass
        time.sleep(0.2)
    raise AssertionError(f"no live {deployment} replica within {timeout:.0f} s")


def _kill_under_load(app, deployment: str, items: list, ref: dict, n_per_client: int = 8) -> dict:
    """Two retrying and two raw (``retries=0``) client threads; once 4 requests are answered, the live
    ``deployment`` replica is killed (``ray.kill``) while it holds requests. Returns the round's figures."""
    import ray

    from cl_service.serve.client import Client

    addr, name = f"127.0.0.1:{app['port']}", app["cfg"].app_name
    retrying, raw = Client(addr, token=TOKEN, application=name), Client(addr, token=TOKEN, application=name, retries=0)
    calls: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()

    def call(client, kind: str, i: int) -> bool:
        s = items[i % len(items)]
        t0 = time.monotonic()
        try:
            r = client.predict(s.images, s.question, timeout=60)
            rec = {"ok": True, "same": (r.answer, r.expert, r.router.raw_output) == ref[s.id]}
        except grpc.RpcError as e:
            rec = {"ok": False, "code": e.code(), "details": e.details()}
        with lock:
            calls.append({**rec, "kind": kind, "start": t0, "end": time.monotonic()})
        return rec["ok"]

    def retry_worker(k: int) -> None:
        for i in range(n_per_client):
            call(retrying, "retrying", 2 * i + k)

    def raw_worker(k: int) -> None:
        i = k
        while not stop.is_set():
            if not call(raw, "raw", i):
                stop.wait(0.2)  # a plain client that fails moves on to its next request
            i += 1

    handle = _live_replica(name, deployment)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(retry_worker, k) for k in range(2)] + [pool.submit(raw_worker, k) for k in range(2)]
        deadline = time.monotonic() + 60
        while sum(c["ok"] for c in list(calls)) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        while ray.get(handle.get_num_ongoing_requests.remote(), timeout=10) < 1 and time.monotonic() < deadline:
            pass  # kill it while it holds requests
        t_kill = time.monotonic()
        ray.kill(handle, no_restart=False)
        for f in futs[:2]:
            f.result(timeout=120)
        stop.set()
        for f in futs[2:]:
            f.result(timeout=70)
    retrying.close()
    raw.close()
    by = {k: [c for c in calls if c["kind"] == k] for k in ("raw", "retrying")}
    after = [c["end"] for c in calls if c["ok"] and c["start"] > t_kill]
    return {"deployment": deployment, "retrying_requests": len(by["retrying"]),
            "retrying_failed": [c["details"] for c in by["retrying"] if not c["ok"]], "retries": retrying.retried,
            "raw_requests": len(by["raw"]), "raw_failed": [(c["code"], c["details"]) for c in by["raw"] if not c["ok"]],
            "mismatches": sum(c["ok"] and not c["same"] for c in calls),
            "recovery_s": round(min(after) - t_kill, 2) if after else None}


def test_a_killed_router_or_expert_replica_costs_a_retrying_client_nothing(app, pytestconfig):
    """Issue 23: the Expert replica, then the Router replica, killed under a bounded load. Requests inside the dead
    replica fail ``UNAVAILABLE`` (the ingress maps the replica's ``ActorDiedError``), those sent meanwhile wait for
    Serve's new replica; a client that retries UNAVAILABLE gets every answer, equal to the answers before the
    kills. The figures go to ``.pytest_cache/d/serve-faults/summary.txt``."""
    items = _samples(app["shards"], "RS")[:3] + _samples(app["shards"], "Med")[:3]
    ref = {}
    for s in items:
        r = app["client"].predict(s.images, s.question, timeout=60)
        ref[s.id] = (r.answer, r.expert, r.router.raw_output)
    rounds = [_kill_under_load(app, d, items, ref) for d in ("Expert", "Router")]
    lines = [f"{r['deployment']} replica killed: retrying client {r['retrying_requests']} requests, "
             f"{len(r['retrying_failed'])} failed, {r['retries']} retries; raw client {len(r['raw_failed'])}/"
             f"{r['raw_requests']} failed; recovery {r['recovery_s']} s" for r in rounds]
    summary = "; ".join(lines)
    if getattr(pytestconfig, "cache", None) is not None:  # also with -s: printed
        (pytestconfig.cache.mkdir("serve-faults") / "summary.txt").write_text(summary + "\n")
    print(summary)
    for r in rounds:
        assert not r["retrying_failed"] and r["retrying_requests"] == 16 and not r["mismatches"], summary
        assert all(code == grpc.StatusCode.UNAVAILABLE and f"the {r['deployment']} replica serving this request was "
                   "lost" in details for code, details in r["raw_failed"]), (summary, r["raw_failed"])
        assert len(r["raw_failed"]) + r["retries"] >= 1, summary  # requests were inside the killed replica
        assert r["recovery_s"] is not None and 0 < r["recovery_s"] < 60, summary


@pytest.mark.parametrize("continuous", [False, True])
def test_expert_refuses_past_max_queued(app, continuous):
    """An Expert replica (its class, in process) whose model is held busy: ``max_queued`` requests wait, the next
    gets ``RESOURCE_EXHAUSTED`` at once, and the waiting ones are answered once the model is free, with the
    answers of the run's offline evaluation (each with the expert it used)."""
    import asyncio
    import threading

    from cl_service._cfgload import to_dict
    from cl_service.on_ray import serve as clserve, serve_start
    from cl_service.serve.catalog import Catalog, RequestError

    cfg = serve_start.override(app["cfg"], continuous=continuous, max_queued=2, **{"expert.batch_wait_ms": 0.0})
    expert = clserve.Expert.func_or_class(to_dict(cfg))
    stage, cat = expert.stage, Catalog.load(cfg.results)
    gate = threading.Event()
    if continuous:
        join = stage.cont._join
        stage.cont._join = lambda take: (gate.wait(60), join(take))
    else:
        run = stage.batcher.fn

        async def held(items):
            await asyncio.to_thread(gate.wait, 60)
            return await run(items)

        stage.batcher.fn = held
    s = _samples(app["shards"], "Med")
    ref = _offline(app["out"], "stage-1-Med", "Med")
    path = {x.id: str(cat.find(ref[x.id]["metadata"]["expert"]).path) for x in s}

    async def drive():
        first = asyncio.ensure_future(expert.answer(s[0], path[s[0].id], None))
        await asyncio.sleep(0.3)  # the first request is taken by the model (held at the gate)
        waiting = [asyncio.ensure_future(expert.answer(x, path[x.id], None)) for x in s[1:3]]
        await asyncio.sleep(0.2)
        with pytest.raises(RequestError) as ei:
            await expert.answer(s[3], path[s[3].id], None)
        gate.set()
        return ei.value, await asyncio.wait_for(asyncio.gather(first, *waiting), 120)

    try:
        err, answers = asyncio.run(drive())
    finally:
        stage.close()
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued=2" in err.message
    assert [a.text for a in answers] == [ref[x.id]["text"] for x in s[:3]]
    assert all(a.prompt_tokens > 0 and 1 <= a.completion_tokens <= 3 for a in answers)
