"""Base pre-training of a from-scratch profile: tokenizer + full-model training on ``generic-captions``.

The CL tasks are never seen here (their *text* is in the tokenizer corpus, so the vocabulary covers
them, but no image-answer pair of a CL task is trained on). The corpus teaches visual basics that the
experts build on — shapes, colours, counts, positions, glyphs, slopes — in every answer format the
streams use. The result is frozen and saved as the base of every run (:mod:`cl_service.models.store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from cl_service.data.schema import Sample
from cl_service.models.config import ModelCfg
from cl_service.models.mllm import MLLM, build_mllm, prompt_text, target_text
from cl_service.models.tokenizer import train_tokenizer
from cl_service.registry import Registry
from cl_service.train.loop import Batches, TrainCfg, TrainState, train_steps

GENERIC = "generic-captions"


@dataclass(frozen=True)
class PretrainCfg:
    """How a profile's base is pre-trained."""

    steps: int = 300
    """Optimizer steps of full-model training."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 1e-3
    """Peak learning rate (warmup, then cosine to 10%)."""
    warmup_ratio: float = 0.05
    """Share of steps in linear warmup."""
    samples: int = 10000
    """Distinct generic-captions samples generated (cycled through when steps × batch exceeds them)."""
    tokenizer_samples: int = 150
    """Samples per task of each of ``tokenizer_benchmarks`` whose text enters the tokenizer corpus."""
    tokenizer_benchmarks: tuple[str, ...] = ("acl-glyphs", "dcl-mini", GENERIC)
    """The built-in benchmarks whose text the tokenizer learns from, in this order. A fixed list, so that
    a new or reworded stream does not change the base: byte-level BPE encodes any text, a new word costs only
    a few more tokens. Measured: acl-mini's redesign put its text in the corpus (all registered benchmarks
    were then used), the rebuilt base's tokenizer changed (998 against 920 entries), and on that base
    dcl-mini fell short of the paper's shape: Oracle 43.3 against zero-shot's 15.6, the MLLM router 89% on Med."""
    vision_lr_scale: float = 0.0
    """Learning-rate multiplier of the CLIP tower; 0 keeps the tower at its seeded random init (measured
    on dcl-mini: training it on this corpus specialises it and costs later experts 6-13 points)."""


PRETRAIN: Registry[PretrainCfg] = Registry("pretrain recipe")
PRETRAIN.register("tiny", PretrainCfg())


def _benchmarks():
    from cl_service.data.synth import BENCHMARKS

    try:  # the generic corpus may not be imported by the package __init__
        import cl_service.data.synth.generic  # noqa: F401
    except ImportError:
        pass
    return BENCHMARKS


TOKENIZER_BENCHMARKS = PretrainCfg.tokenizer_benchmarks


def corpus_texts(samples_per_task: int = 300, seed: int = 0,
                 names: tuple[str, ...] = TOKENIZER_BENCHMARKS) -> Iterator[str]:
    """Tokenizer corpus: the prompts and targets of the benchmarks ``names`` (both splits, in the exact
    template), every reference answer variant, and MLLM-router prompts over each benchmark's tasks
    and over the paper's tasks (with their target letters)."""
    from cl_service.data.tasks import PAPER_TASKS
    from cl_service.routers.prompt import Pool, router_prompt

    benchmarks = _benchmarks()
    pools = [Pool(tuple(PAPER_TASKS), tuple(t.description for t in PAPER_TASKS.values()))]
    for name in names:
        spec = benchmarks.get(name)
        if len(spec.tasks) > 1:
            pools.append(Pool(tuple(spec.task_names), tuple(t.description for t in spec.tasks)))
        for split in ("train", "test"):
            for s in spec.generate(split, samples_per_task, seed):
                yield prompt_text(s.question) + target_text(s.answer)
                for a in s.answers[1:]:
                    yield target_text(a)
                index = int(s.id.rsplit("-", 1)[-1])
                if split == "train" and index < 20:
                    for pool in pools:
                        letter = pool.letters[index % len(pool.experts)]
                        yield prompt_text(router_prompt(pool, s.question)) + target_text(letter)


def base_tokenizer(vocab_size: int, samples_per_task: int = 300, seed: int = 0,
                   names: tuple[str, ...] = TOKENIZER_BENCHMARKS):
    """The tokenizer of from-scratch bases: byte-level BPE over :func:`corpus_texts`."""
    return train_tokenizer(corpus_texts(samples_per_task, seed, names), vocab_size=vocab_size)


def pretrain_samples(n: int, seed: int = 0) -> list[Sample]:
    """``n`` training samples of the generic-captions corpus (question types balanced)."""
    return list(_benchmarks().get(GENERIC).generate("train", n, seed))


def corpus_fingerprint(per_split: int = 4, seed: int = 0, names: tuple[str, ...] = TOKENIZER_BENCHMARKS) -> str:
    """A short digest of what a from-scratch base is built from, beyond its recipe: the first ``per_split``
    samples of the pre-training corpus (images and text), the text of the first ``per_split`` samples of
    the other benchmarks in ``names`` (the tokenizer learns from them) and an MLLM-router prompt. Code
    that changes what the base learns from changes it, so a base built by other code is not taken for this
    one; a change to another benchmark's images alone, or to a benchmark not in ``names``, does not."""
    from cl_service.data.tasks import PAPER_TASKS
    from cl_service.routers.prompt import Pool, router_prompt

    h = hashlib.sha256()
    benchmarks = _benchmarks()
    for name in sorted(set(names) | {GENERIC}):
        for split in ("train", "test"):
            for s in benchmarks.get(name).generate(split, per_split, seed):
                h.update("\0".join([s.id, s.question, *s.answers]).encode())
                if name == GENERIC:
                    for img in s.images:
                        h.update(img)
    pool = Pool(tuple(PAPER_TASKS), tuple(t.description for t in PAPER_TASKS.values()))
    h.update(prompt_text(router_prompt(pool, "?")).encode() + target_text("A").encode())
    return h.hexdigest()[:16]


def pretrain(mllm: MLLM, samples: list[Sample], cfg: PretrainCfg, seed: int = 0,
             on_step: Callable[[TrainState], bool | None] | None = None) -> TrainState:
    """Full-model training (vision tower, projector, decoder) on ``samples``; returns the run's state."""
    params = [p for p in mllm.model.parameters()]
    vision = [p for p in mllm.model.model.vision_tower.parameters()]
    ids = {id(p) for p in vision}
    rest = [p for p in params if id(p) not in ids]
    groups = [{"params": rest}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": vision, "lr_scale": cfg.vision_lr_scale})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    tc = TrainCfg(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio,
                  min_lr_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, seed=seed)
    batches = Batches(samples, lambda b: mllm.collate(b, train=True), cfg.batch_size, seed=seed)
    try:
        return train_steps(mllm, batches, groups, tc, on_step=on_step)
    finally:
        for p in params:
            p.requires_grad_(False)
        mllm.model.eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_pretrained(model_cfg: ModelCfg, cfg: PretrainCfg, seed: int = 0, progress: bool = True,
                     log: Callable[[str], None] = print, device: str | None = None) -> tuple[MLLM, dict]:
    """Tokenizer → random model → pre-training (on ``device``, default CUDA when present). Returns the
    frozen model (moved back to CPU) and a summary dict."""
    t0 = time.perf_counter()
    tok = base_tokenizer(model_cfg.vocab_size, cfg.tokenizer_samples, seed, cfg.tokenizer_benchmarks)
    mllm = build_mllm(model_cfg, tok, seed=seed).to(device or default_device())
    samples = pretrain_samples(cfg.samples, seed)
    log(f"pre-training {model_cfg.name} ({mllm.num_parameters() / 1e6:.2f}M parameters, vocab {len(tok)}) "
        f"for {cfg.steps} steps of {cfg.batch_size} on {len(samples)} {GENERIC} samples")
    bar = None
    if progress:
        from cl_service._progress import bar as _bar

        bar = _bar(cfg.steps, f"base {model_cfg.name}", unit="step")

    def on_step(state: TrainState) -> None:
        if bar is not None:
            bar.update(1)
            if state.step % 10 == 0:
                bar.set_postfix(loss=f"{sum(state.losses[-10:]) / len(state.losses[-10:]):.3f}")

    t1 = time.perf_counter()
    try:
        state = pretrain(mllm, samples, cfg, seed, on_step)
    finally:
        if bar is not None:
            bar.close()
    mllm.to("cpu")
    tail = state.losses[-max(1, len(state.losses) // 20):]
    summary = {"profile": model_cfg.name, "model": dataclasses.asdict(model_cfg), "pretrain": dataclasses.asdict(cfg),
               "seed": seed, "parameters": mllm.num_parameters(), "vocab": len(tok),
               "final_loss": sum(tail) / len(tail), "first_loss": state.losses[0],
               "train_seconds": round(time.perf_counter() - t1, 1), "seconds": round(time.perf_counter() - t0, 1),
               "torch_threads": torch.get_num_threads(), "device": str(device or default_device())}
    return mllm, summary
