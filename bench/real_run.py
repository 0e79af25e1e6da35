"""The real job on one GPU, through the product's own commands: ``clsvc run`` then ``clsvc serve``.

    python -m bench.real_run --out bench/results/local/real_run.json [--work /tmp/clsvc-real]

1. writes a LLaVA-1.5-7B-shaped checkpoint in the llava-hf layout (random bf16 weights, a SentencePiece-style
   tokenizer padded to 32064 entries, the llava-1.5 chat template, a CLIP processor at 336 px; no cl-service
   metadata, so the run speaks the checkpoint's own format) and dcl-mini rendered at 336 px as Arrow shards;
2. runs ``clsvc run`` on it (a subprocess, local Ray on loopback): 5 tasks, ``mrlora mrlora_knn lora_ft oracle
   zero_shot``, experts LoRA r128 on every decoder Linear + projector (the paper's shape) on a short schedule,
   training in a Ray Train worker on the GPU and evaluation in an evaluator actor on the same GPU (0.5 GPU each,
   so both keep the base resident), 32 test items per task;
3. serves the finished folder with ``clsvc serve`` (Ray Serve, Router and Expert on the GPU) and runs a bounded
   load test through gRPC (``bench/serve_load.py``, loopback);
4. reports wall time per phase, training tokens/s inside the run (each job's ``train_log.json``), evaluation
   answers/s (the stage records), peak GPU memory and utilisation (``nvidia-smi`` sampled every 0.5 s), and the
   share of the run's wall time spent in training steps and evaluation batches.

Random weights do not change speed; the accuracies are meaningless here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.paths import portable  # noqa: E402

METHODS = "mrlora,mrlora_knn,lora_ft,oracle,zero_shot"


def write_base(path: Path, seed: int = 0) -> dict[str, Any]:
    """A random LLaVA-1.5-7B-shaped llava-hf folder at ``path`` (built on the GPU in bf16, then saved)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from cl_service.data.synth import BENCHMARKS
    from cl_service.models.config import PROFILES
    from cl_service.models.tiny_hf import (LLAVA_15_CHAT_TEMPLATE, _CORPUS, clip_image_processor, sp_tokenizer,
                                           tiny_text_config, tiny_vision_config)

    if (path / "config.json").is_file():
        return {"reused": True}
    t0 = time.perf_counter()
    p = PROFILES.get("llava-7b")
    texts = list(_CORPUS) + [s.question + " " + s.answers[0] for s in BENCHMARKS.get("dcl-mini").generate("train", 20, 0)]
    tok = sp_tokenizer(texts, vocab_size=1024)
    tok.add_tokens([f"<x{i}>" for i in range(p.vocab_size - len(tok))])  # the real embedding/lm_head shapes
    vision = tiny_vision_config(p.image_size, p.patch_size)
    vision.update(dict(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                       num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads))
    text = tiny_text_config(tok)
    text.update(dict(hidden_size=p.text_hidden, intermediate_size=p.text_intermediate, num_hidden_layers=p.text_layers,
                     num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads, vocab_size=len(tok),
                     max_position_embeddings=4096))
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=(p.image_size // p.patch_size) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # keep activations in range through 32 random layers
        for n, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in n:
                w.normal_(0.0, 0.02)
    built = time.perf_counter() - t0
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    LlavaProcessor(image_processor=clip_image_processor(p.image_size), tokenizer=tok, patch_size=p.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_15_CHAT_TEMPLATE).save_pretrained(tmp)
    os.replace(tmp, path)
    del model
    torch.cuda.empty_cache()
    return {"build_s": round(built, 1), "write_s": round(time.perf_counter() - t0 - built, 1)}


def write_data(path: Path, train: int, test: int, size: int = 336, question_words: int = 0) -> dict[str, Any]:
    """dcl-mini with every image re-rendered at ``size`` px (bicubic), as Arrow shards; with ``question_words``
    each question is lengthened to about that many words by a context sentence built from its own words
    (the benchmark's training shape is 576 image + 128 text tokens per item)."""
    from PIL import Image

    from cl_service.data.shards import ShardWriter
    from cl_service.data.synth import BENCHMARKS

    if (path / "manifest.json").is_file():
        return {"reused": True}
    t0 = time.perf_counter()
    spec = BENCHMARKS.get("dcl-mini")

    def big(s):
        imgs = []
        for b in s.images:
            with Image.open(io.BytesIO(b)) as im:
                out = io.BytesIO()
                im.convert("RGB").resize((size, size), Image.BICUBIC).save(out, format="PNG")
                imgs.append(out.getvalue())
        q = s.question
        if question_words:
            words = q.split()
            pad = [words[i % len(words)] for i in range(max(0, question_words - len(words)))]
            q = ("Context: " + " ".join(pad) + ". " if pad else "") + q
        return type(s)(**{**s.__dict__, "images": imgs, "question": q})

    tasks = [{"name": t.name, "scorer": t.scorer, "description": t.description} for t in spec.tasks]
    with ShardWriter(path, tasks, info={"benchmark": "dcl-mini@336", "stream": spec.task_names}, overwrite=True) as w:
        w.add_all(big(s) for s in spec.generate("train", train, 0))
        w.add_all(big(s) for s in spec.generate("test", test, 0))
    return {"seconds": round(time.perf_counter() - t0, 1)}


class GpuMonitor:
    """``nvidia-smi`` sampled every ``every`` seconds: utilisation and memory in use, with timestamps."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[0]
                util, mem = (float(x) for x in out.split(","))
                self.samples.append((time.time(), util, mem))
            except Exception:  # a missed sample is not an error
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> "GpuMonitor":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=10)

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {}
        return {"samples": len(s), "util_mean_pct": round(sum(x[1] for x in s) / len(s), 1),
                "busy_share": round(sum(x[1] > 0 for x in s) / len(s), 3),
                "mem_peak_gib": round(max(x[2] for x in s) / 1024, 1)}


def _run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = -9
    log.write_text(portable(log.read_text(errors="replace")))  # committed with the results: no path of this machine
    return rc, time.perf_counter() - t0


def run_figures(run: Path, wall: float) -> dict[str, Any]:
    """Figures of a finished run folder: per job (train_log.json), per stage and in total (stage records).

    An adapter published as a copy of an identical job (``cloned_from`` in its ``adapter.json``: ``lora_ft``'s
    first stage is the first expert) carries that job's ``train_log.json``; it is listed with ``cloned_from`` but
    counted once, in the job that trained it."""
    jobs = []
    for f in sorted((run / "adapters").rglob("train_log.json")):
        j = json.loads(f.read_text())
        meta = f.parent / "adapter.json"
        cloned = json.loads(meta.read_text()).get("cloned_from") if meta.is_file() else None
        jobs.append({k: j.get(k) for k in ("job", "steps", "tokens_per_s", "load_seconds", "train_seconds", "seconds",
                                           "peak_gpu_gib", "device", "dtype")}
                    | {"tokens": sum(j.get("step_tokens") or []),
                       "tokens_per_step": round(sum(j.get("step_tokens") or [0]) / max(1, len(j.get("step_tokens") or [])))}
                    | ({"cloned_from": cloned} if cloned else {}))
    stages: dict[int, dict[str, Any]] = {}
    answered, eval_s = 0, 0.0
    for f in sorted((run / "stages").rglob("*.json")):
        r = json.loads(f.read_text())
        n = sum(len((run / "predictions" / r["method"] / f"stage-{r['stage']}-{r['task']}" / f"{t}.jsonl").read_text().splitlines())
                for t in r["tasks"] if (run / "predictions" / r["method"] / f"stage-{r['stage']}-{r['task']}" / f"{t}.jsonl").is_file())
        st = stages.setdefault(r["stage"], {"task": r["task"], "train_s": r["train_s"], "eval_s": 0.0, "answers": 0})
        st["eval_s"] += r["eval_s"]
        st["answers"] += n
        answered += n
        eval_s += r["eval_s"]
    totals = job_totals(jobs)
    return {"jobs": jobs, "stages": stages, **totals, "eval_s": round(eval_s, 1), "answers": answered,
            "eval_answers_per_s": round(answered / eval_s, 1) if eval_s else None,
            "share_in_steps_and_eval": round((totals["train_steps_s"] + eval_s) / wall, 3) if wall else None}


def job_totals(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Training figures over the jobs that trained: a copy (``cloned_from``) is the job it copies, counted once."""
    trained = [j for j in jobs if "cloned_from" not in j]
    steps_s = sum(j["train_seconds"] or 0 for j in trained)
    rates = sorted(j["tokens_per_s"] for j in trained if j["tokens_per_s"])
    return {"train_tokens_per_s_overall": round(sum(j["tokens"] for j in trained) / steps_s, 1) if steps_s else None,
            "train_tokens_per_s_jobs_median": rates[len(rates) // 2] if rates else None,
            "train_steps_s": round(steps_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/local/real_run.json")
    ap.add_argument("--work", default="/tmp/clsvc-real")
    ap.add_argument("--train-per-task", type=int, default=64)
    ap.add_argument("--test-per-task", type=int, default=32)
    ap.add_argument("--expert-steps", type=int, default=24)
    ap.add_argument("--router-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default=METHODS, help="the methods clsvc run trains and evaluates (comma-separated)")
    ap.add_argument("--run-timeout", type=float, default=420)
    ap.add_argument("--serve-seconds", type=float, default=20)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--question-words", type=int, default=0,
                    help="lengthen every question to about this many words (90: ~704 tokens per training item)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: a tiny llava-hf folder, 32 px data, no GPU keys")
    ap.add_argument("overrides", nargs="*", help="more RunCfg overrides for clsvc run")
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": vars(a)}

    def save() -> None:
        out.write_text(json.dumps(portable(res), indent=2))

    t = time.perf_counter()
    if a.smoke:
        from cl_service.models.tiny_hf import write_tiny_llava_hf

        res["base"] = {} if (work / "llava-7b-hf").is_dir() else {"tiny": str(write_tiny_llava_hf(work / "llava-7b-hf"))}
    else:
        res["base"] = write_base(work / "llava-7b-hf")
    res["base"]["seconds"] = round(time.perf_counter() - t, 1)
    print("base", res["base"], flush=True)
    data = work / (f"dcl-336-q{a.question_words}" if a.question_words else "dcl-336")
    res["data"] = write_data(data, a.train_per_task, a.test_per_task, 32 if a.smoke else 336, a.question_words)
    print("data", res["data"], flush=True)
    save()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    run = work / out.stem  # one run folder per result file: a second suite on the same machine starts its own
    cmd = [sys.executable, "-m", "cl_service.cli", "run", "--out", str(run), "--data", str(data),
           "--methods", a.methods, f"base.path={work / 'llava-7b-hf'}", "ray.use_gpu=true", "ray.num_workers=1",
           "ray.cpus_per_worker=4", "ray.gpus_per_worker=0.5", "eval.num_workers=1", "eval.num_gpus=0.5",
           "eval.cpus_per_worker=4", "eval.batch_size=64", "eval.max_new_tokens=8", "ray.checkpoint_every=1000",
           f"data.test_limit={a.test_per_task}", "expert.lora.rank=128", "expert.lora.alpha=256",
           "expert.lora.dropout=0", f"expert.train.max_steps={a.expert_steps}", f"expert.train.batch_size={a.batch}",
           "expert.train.lr=2e-5", "router.lora.rank=16", "router.lora.alpha=32", "router.lora.dropout=0",
           f"router.train.max_steps={a.router_steps}", f"router.train.batch_size={a.batch}", "router.samples_per_task=8",
           "router.max_new_tokens=1", *a.overrides]
    if a.smoke:  # CPU: drop the GPU keys, evaluate in one CPU actor
        cmd = [c for c in cmd if not c.startswith(("ray.use_gpu", "ray.gpus_per_worker", "eval.num_gpus", "ray.cpus_per_worker",
                                                   "eval.cpus_per_worker", "expert.lora.rank", "expert.lora.alpha"))]
        cmd += ["ray.cpus_per_worker=1", "eval.cpus_per_worker=1", "expert.lora.rank=4", "expert.lora.alpha=8"]
    res["run_cmd"] = " ".join(cmd)
    with GpuMonitor() as mon:
        t0 = time.time()
        rc, wall = _run_logged(cmd, out.with_suffix(".log"), a.run_timeout, env)
        t1 = time.time()
        res["run"] = {"rc": rc, "wall_s": round(wall, 1), "gpu": mon.summary(t0, t1)}
        print("run", res["run"], flush=True)
        if (run / "stages").is_dir():
            res["run"].update(run_figures(run, wall))
        save()
        if rc == 0 and not a.skip_serve:
            res["serve"] = serve_and_load(run, out.parent, a.serve_seconds, env, mon, gpu=not a.smoke)
            save()
    print(json.dumps({k: v for k, v in res.get("run", {}).items() if k not in ("jobs",)}, indent=1)[:4000])
    print("serve", json.dumps(res.get("serve"), indent=1)[:2000])
    return 0 if res.get("run", {}).get("rc") == 0 else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(run: Path, logs: Path, seconds: float, env: dict[str, str], mon: GpuMonitor,
                   gpu: bool = True) -> dict[str, Any]:
    """``clsvc serve`` on the GPU (Router and Expert 0.5 GPU each), then ``bench/serve_load.py`` through gRPC."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cl_service.cli", "serve", "--results", str(run), "--port", str(port), "--insecure",
           *(["router.num_gpus=0.5", "expert.num_gpus=0.5"] if gpu else []),
           "router.max_batch_size=32", "expert.max_batch_size=32"]
    t0 = time.perf_counter()
    f = open(logs / "real_serve.log", "w")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out: dict[str, Any] = {"cmd": " ".join(cmd)}
    try:
        from cl_service.serve.client import Client

        ready = False
        while time.perf_counter() - t0 < 240 and p.poll() is None:
            try:
                with Client(f"127.0.0.1:{port}") as c:
                    ready = c.health(timeout=5) == "SERVING"
            except Exception:
                ready = False
            if ready:
                break
            time.sleep(2)
        out["start_s"] = round(time.perf_counter() - t0, 1)
        out["ready"] = ready
        if ready:
            t1 = time.time()
            rc, wall = _run_logged([sys.executable, str(REPO / "bench" / "serve_load.py"), "--results", str(run),
                                    "--address", f"127.0.0.1:{port}", "--clients", "32", "--seconds", str(seconds),
                                    "--json", str(logs / "real_serve_load.json")], logs / "real_serve_load.log",
                                   seconds + 180, env)
            out["load_rc"] = rc
            out["gpu"] = mon.summary(t1, time.time())
            if (logs / "real_serve_load.json").is_file():
                out["load"] = json.loads((logs / "real_serve_load.json").read_text())
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        f.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
