"""One base MLLM with many LoRA adapters loaded side by side; answers batched per adapter.

Adapters are loaded by folder (verified against their checksummed ``adapter.json``) under internal
names, kept in an LRU cache, and reloaded when the folder's content changes (a retrained router).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers.utils import logging as _hf_logging

from cl_service.adapters.family import answers_with_hooks, family_of, picks_prompts
from cl_service.adapters.lora import delete_adapter, load_adapter, set_active
from cl_service.adapters.registry import ADAPTER_META, read_adapter
from cl_service.data.schema import Sample
from cl_service.engine.cudagraphs import GraphDecoder
from cl_service.engine.gate import PassGate
from cl_service.engine.labels import route_labels
from cl_service.engine.memo import Memo, content_digest
from cl_service.engine.mixture import Mixture, answer_mixture
from cl_service.engine.multilora import MultiLoRA
from cl_service.models.mllm import MLLM, load_mllm
from cl_service.models.prompting import first_answer_tokens
from cl_service.routers.base import Route
from cl_service.routers.prompt import Pool, parse_choice, router_sample

_hf_logging.disable_progress_bar()  # one bar per adapter load floods job logs


class Engine:
    """Inference over a frozen base plus adapters.

    Args:
        base: a local checkpoint folder (or an already loaded :class:`MLLM`).
        cfg: a ``RunCfg`` (``eval.batch_size``, ``eval.max_new_tokens``, ``router.max_new_tokens``) or None.
        max_loaded: adapters kept on the model's device at once (least recently used ones leave).
        max_host_adapters: adapters that left the device kept in host memory (pinned on a GPU machine),
            so one needed again is paged back in without reading and verifying its files; 0: dropped.
        device: where a base loaded from a folder goes (e.g. ``"cuda"``); None = where it loads (CPU).
        dtype, prompt_style: how a base loaded from a folder is loaded (:func:`load_mllm`).
        fused_kernels: on a GPU, run the decoder's norms, rotary embedding and SwiGLU through fused kernels
            (:meth:`MLLM.fuse_kernels`); no effect on the CPU.
        cuda_graphs: ``True`` / ``"auto"``: on a GPU, the decode steps of the stacked multi-adapter path
            (:meth:`answer_mixed`, so also :meth:`answer` with ``fused_lora`` and multi-token MLLM routing)
            replay captured CUDA graphs (:mod:`cl_service.engine.cudagraphs`); ``False``: eager steps. No effect
            on the CPU. Settable later as the attribute ``cuda_graphs``.
    """

    def __init__(self, base: str | Path | MLLM, cfg: Any = None, max_loaded: int = 32,
                 fused_lora: bool = False, device: str | None = None, fused_kernels: bool = True,
                 dtype: str | None = None, prompt_style: str = "auto", cuda_graphs: bool | str = "auto",
                 max_host_adapters: int = 32) -> None:
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs must be True, False or 'auto', not {cuda_graphs!r}")
        self.mllm = base if isinstance(base, MLLM) else load_mllm(base, dtype=dtype, device=device,
                                                                   prompt_style=prompt_style)
        if fused_kernels and self.mllm.device.type == "cuda":
            self.mllm.fuse_kernels()
        #: answer/route_mllm through the stacked multi-adapter path (:mod:`cl_service.engine.multilora`)
        #: instead of peft's per-adapter modules; answer_mixed always uses it.
        self.fused_lora = fused_lora
        self.multi = MultiLoRA(self.mllm)
        self.cuda_graphs = cuda_graphs
        self._graphs: GraphDecoder | None = None  # built at the first decode on a GPU
        self._multi_loaded: OrderedDict[str, str | None] = OrderedDict()  # path -> digest
        self._multi_parked: OrderedDict[str, str | None] = OrderedDict()  # in host memory: path -> digest
        self.max_host_adapters = max_host_adapters
        #: adapter loads into the stacked set: "disk" (read + verified), "host" (paged back in), "parked"
        #: (left the device for host memory), "dropped", "fetched" (read into host memory ahead of its use,
        #: :meth:`fetch_adapter`)
        self.paging: Counter[str] = Counter()
        # The mixed paths may run in two threads at once (a router batch next to an expert batch,
        # cl_service.engine.pipeline): loading/dropping adapters is serialised, and an adapter in use by
        # a running call is never the one dropped to make room.
        self._multi_lock = threading.RLock()
        self._pinned: Counter[str] = Counter()
        # peft's active adapter and MoE-LoRA's hooks are switches every thread sees: passes that flip them run
        # alone, the others (peft off, per-thread row plans) together (cl_service.engine.gate)
        self.gate = PassGate(self.mllm.adapters_disabled)
        self.mllm.model.eval()
        self.batch_size = cfg.eval.batch_size if cfg is not None else 64
        self.max_new_tokens = cfg.eval.max_new_tokens if cfg is not None else 8
        self.router_max_new_tokens = cfg.router.max_new_tokens if cfg is not None else 4
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple[str, str]] = OrderedDict()  # path -> (name, digest)
        self._used: set[str] = set()
        self._n = 0
        self._memo = Memo()  # see enable_memo
        self._decoders: ThreadPoolExecutor | None = None
        self._hooked: dict[str, dict] = {}  # per adapter family answered through its hooks: its loaded adapters
        # the first token the base emits for each letter after its prompt (not a bare "▁" before it)
        self._letter_ids = first_answer_tokens(self.mllm, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        self._label_cache: dict[str, tuple[int, ...]] = {}  # multi-letter label -> its tokens (engine.labels)

    # ------------------------------------------------------------------ adapters
    def _activate(self, path: str | None) -> None:
        if path is None:
            return
        key = str(Path(path).resolve())
        digest = _meta_digest(key)
        hit = self._loaded.get(key)
        if hit is not None and hit[1] != digest:
            delete_adapter(self.mllm, hit[0])
            del self._loaded[key]
            hit = None
        if hit is None:
            read_adapter(key)  # complete and checksums match, or AdapterError
            self._n += 1
            name = f"a{self._n}"
            load_adapter(self.mllm, key, name, trainable=False)
            self._loaded[key] = (name, digest)
            while len(self._loaded) > self.max_loaded:
                old, (old_name, _) = self._loaded.popitem(last=False)
                delete_adapter(self.mllm, old_name)
        self._loaded.move_to_end(key)
        set_active(self.mllm, self._loaded[key][0])
        self._used.add(key)

    def used_adapters(self) -> list[Path]:
        return [Path(p) for p in sorted(self._used)]

    def reset_used(self) -> None:
        self._used.clear()

    def forget_missing(self) -> None:
        """Drop cached adapters (peft-loaded, stacked or parked in host memory) whose folder vanished or changed."""
        stale = [key for key, (_, digest) in list(self._loaded.items()) if _meta_digest(key) != digest]
        if stale:
            with self.gate.exclusive():  # deleting a peft adapter changes modules other passes run through
                for key in stale:
                    delete_adapter(self.mllm, self._loaded.pop(key)[0])
        with self._multi_lock:
            for held, drop in ((self._multi_loaded, self.multi.drop), (self._multi_parked, self.multi.forget)):
                for key, digest in list(held.items()):
                    if _meta_digest(key) != digest:
                        drop(key)
                        del held[key]

    def _multi_key(self, path: str | None) -> str | None:
        """Load (or refresh) the adapter folder ``path`` into the stacked multi-adapter set; its key."""
        if path is None:
            return None
        key = str(Path(path).resolve())
        digest = _meta_digest(key)
        if key in self._multi_loaded and self._multi_loaded[key] != digest:
            self.multi.drop(key)
            del self._multi_loaded[key]
        if key not in self._multi_loaded:
            parked = key in self._multi_parked and self._multi_parked.pop(key) == digest
            if parked and self.multi.unpark(key):  # the same files as when it left the device
                self.paging["host"] += 1
            else:
                self.multi.forget(key)
                fam = family_of(key)
                if answers_with_hooks(fam):
                    raise ValueError(f"{fam.name} adapters are answered by Engine.answer, not in mixed batches: "
                                     f"{key} is {fam.describe(key)}")
                read_adapter(key)  # complete and checksums match, or AdapterError
                self.multi.load(key, key)
                self.paging["disk"] += 1
            self._multi_loaded[key] = digest
        self._multi_loaded.move_to_end(key)
        self._used.add(key)
        return key

    def adapter_on_hand(self, path: str | None) -> bool:
        """Whether :meth:`hold_adapters` would take adapter folder ``path`` without reading its files: on the
        device or in host memory with the same ``adapter.json`` (None, the base: always)."""
        if path is None:
            return True
        key = str(Path(path).resolve())
        digest = _meta_digest(key)
        with self._multi_lock:
            return any(key in held and held[key] == digest for held in (self._multi_loaded, self._multi_parked))

    def fetch_adapter(self, path: str) -> None:
        """Read and verify adapter folder ``path`` into host memory (pinned on a GPU machine), so that a later
        :meth:`hold_adapters` only copies it to the device. The slow part (its files, their checksums) holds
        no lock a running call waits on: a continuous batch's loader thread calls this while rows decode.
        Nothing to do when the adapter is on hand (:meth:`adapter_on_hand`)."""
        key = str(Path(path).resolve())
        if self.adapter_on_hand(key):
            return
        fam = family_of(key)
        if answers_with_hooks(fam):
            raise ValueError(f"{fam.name} adapters are answered by Engine.answer, not in mixed batches: "
                             f"{key} is {fam.describe(key)}")
        digest = _meta_digest(key)
        read_adapter(key)  # complete and checksums match, or AdapterError
        host = self.multi.fetch(key, key)
        with self._multi_lock:
            if key in self._multi_loaded or _meta_digest(key) != digest:  # loaded meanwhile, or rewritten
                return
            self.multi.add_parked(host)
            self._multi_parked[key] = digest
            self._multi_parked.move_to_end(key)
            self.paging["disk"] += 1
            self.paging["fetched"] += 1

    def _trim_multi(self, keep: set[str]) -> None:
        with self._multi_lock:
            while len(self._multi_loaded) > max(self.max_loaded, len(keep)):
                old = next((k for k in self._multi_loaded if k not in keep and not self._pinned[k]), None)
                if old is None:  # everything else is in use by a running call: drop later
                    return
                self._evict(old)

    def _evict(self, key: str) -> None:
        """Adapter ``key`` leaves the device: into host memory (the least recently parked ones dropped
        beyond ``max_host_adapters``), or dropped."""
        digest = self._multi_loaded.pop(key)
        if self.max_host_adapters <= 0:
            self.multi.drop(key)
            self.paging["dropped"] += 1
            return
        self.multi.park(key)
        self._multi_parked[key] = digest
        self.paging["parked"] += 1
        while len(self._multi_parked) > self.max_host_adapters:
            old, _ = self._multi_parked.popitem(last=False)
            self.multi.forget(old)
            self.paging["dropped"] += 1

    def hold_adapters(self, adapters: Sequence[str | None]) -> list[str | None]:
        """The stacked-set keys of adapter folders ``adapters`` (loaded as needed; None = the base), kept loaded
        until :meth:`release_adapters` gives them back (a continuous batch holds a row's adapter while it decodes)."""
        with self._multi_lock:
            keys = [self._multi_key(a) for a in adapters]
            used = [k for k in keys if k is not None]
            self._trim_multi(set(used) | {k for k, n in self._pinned.items() if n > 0})
            self._pinned.update(used)
        return keys

    def release_adapters(self, keys: Sequence[str | None]) -> None:
        """Give back keys from :meth:`hold_adapters` (each once)."""
        with self._multi_lock:
            self._pinned -= Counter(k for k in keys if k is not None)  # keeps only keys still in use

    @contextlib.contextmanager
    def _multi_use(self, adapters: Sequence[str | None]):
        """The stacked-set keys of ``adapters`` (loaded as needed), kept loaded until the block ends."""
        keys = self.hold_adapters(adapters)
        try:
            yield keys
        finally:
            self.release_adapters(keys)

    def continuous(self, **kw: Any) -> "ContinuousBatcher":
        """Stage two with continuous batching over this engine: requests join the running decode between steps
        (:class:`cl_service.engine.continuous.ContinuousBatcher`, which documents ``kw``)."""
        from cl_service.engine.continuous import ContinuousBatcher

        return ContinuousBatcher(self, **kw)

    def _run(self, path: str | None, fn):
        """``fn()`` through peft with adapter folder ``path`` active (None: the plain base, a shared pass)."""
        if path is None:
            with self.gate.shared():
                return fn()
        with self.gate.exclusive():  # peft's active adapter is one for the whole model
            self._activate(path)
            return fn()

    def base_passes(self):
        """A block of passes through the plain base (peft's adapters off), per-row LoRA only through
        :meth:`MultiLoRA.rows`: runs next to other such blocks in other threads, never next to a pass that
        switches the whole model (a peft adapter, a MoE-LoRA; :mod:`cl_service.engine.gate`)."""
        return self.gate.shared()

    # ------------------------------------------------------------------ inference
    def answer(self, samples: Sequence[Sample], adapter: str | None, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers with base + ``adapter`` (a folder; None = the plain base)."""
        if not samples:
            return []
        n = max_new_tokens or self.max_new_tokens

        def compute(todo: list[Sample]) -> list[str]:
            fam = family_of(adapter) if adapter is not None else None
            if fam is not None and picks_prompts(fam):  # soft prompts picked per sample
                return self.answer_prompted(todo, adapter, None, n)
            if fam is not None and answers_with_hooks(fam):  # not a peft LoRA: its family's hooks, for the call
                with self.gate.exclusive(), fam.active(self.mllm, adapter, self._hooked.setdefault(fam.name, {}), read_adapter):
                    return self.mllm.generate(todo, n, self.batch_size)
            if self.fused_lora:
                return self.answer_mixed(todo, [adapter] * len(todo), n)
            return self._run(adapter, lambda: self.mllm.generate(todo, n, self.batch_size))

        if self._memo.active() is None:
            return compute(list(samples))
        if adapter is not None:
            self._used.add(str(Path(adapter).resolve()))
        return self._memo.map(("answer", content_digest(adapter), n), samples, compute)

    def choose_prompts(self, samples: Sequence[Sample], adapter: str,
                       vision_states: torch.Tensor | None = None) -> list[str]:
        """For an adapter of soft prompts picked per request (ModalPrompt, :func:`~cl_service.adapters.family.
        picks_prompts`): the task whose prompts answer each sample, chosen by the adapter's family from the
        sample's base routing features (:meth:`routing_features`; ``vision_states`` as there)."""
        fam = self._prompt_family(adapter)
        features = self.routing_features(samples, vision_states)
        return fam.choose(self.mllm, adapter, features, self._hooked.setdefault(fam.name, {}), read_adapter)

    def answer_prompted(self, samples: Sequence[Sample], adapter: str, tasks: Sequence[str] | None = None,
                        max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers of the base with, right after sample ``i``'s BOS, the soft prompt rows that adapter
        folder ``adapter`` holds for task ``tasks[i]`` (default: :meth:`choose_prompts`). Rows of one batch may
        carry different tasks' prompts; the base itself is not switched, so these passes run next to others."""
        fam = self._prompt_family(adapter)
        if tasks is None:
            tasks = self.choose_prompts(samples, adapter)
        if len(tasks) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(tasks)} prompt choices")
        if not samples:
            return []
        with torch.no_grad(), self.base_passes():
            rows = fam.prompt_rows(self.mllm, adapter, list(tasks), self._hooked.setdefault(fam.name, {}), read_adapter)
            return self.mllm.generate(samples, max_new_tokens or self.max_new_tokens, self.batch_size,
                                      prefix_rows=rows)

    def _prompt_family(self, adapter: str) -> Any:
        fam = family_of(adapter)
        if not picks_prompts(fam):
            raise ValueError(f"{adapter} is a {fam.name} adapter, not one of soft prompts picked per request")
        self._used.add(str(Path(adapter).resolve()))
        return fam

    def vision_states(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Base CLIP states of the samples' images ``[N_img, k, vision_hidden]``, computed once and
        reusable by :meth:`route_mllm`, :meth:`features` and :meth:`answer_mixed` for the same samples
        (valid for adapters without vision LoRA; others recompute their own)."""
        def decode(s: Sample) -> torch.Tensor:
            return self.mllm.preprocess_images(s.images, s.id)

        if len(samples) > 1 and self._decoders is None:  # PIL decodes without the GIL: threads overlap images
            with self._multi_lock:
                if self._decoders is None:
                    self._decoders = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="clsvc-img")
        pixels = torch.cat(list(self._decoders.map(decode, samples)) if len(samples) > 1 else [decode(samples[0])])
        with torch.no_grad(), self.base_passes():
            return self.mllm.vision_states(pixels)

    @torch.no_grad()
    def answer_mixed(self, samples: Sequence[Sample], adapters: Sequence[str | None],
                     max_new_tokens: int | None = None, vision_states: torch.Tensor | None = None,
                     on_token: Sequence[Callable[[int], None] | None] | None = None) -> list[str]:
        """Greedy answers where sample ``i`` uses adapter folder ``adapters[i]`` (None = the plain base).

        Rows of different adapters share each batched forward pass of the base
        (:class:`~cl_service.engine.multilora.MultiLoRA`); each row gets its adapter's LoRA and projector.
        ``vision_states`` (:meth:`vision_states` of the same samples) skips the CLIP pass. ``on_token[i]``
        (if not None) gets sample ``i``'s tokens as they are decoded (EOS included), e.g. to stream its answer.
        """
        if len(samples) != len(adapters):
            raise ValueError(f"{len(samples)} samples but {len(adapters)} adapters")
        if not samples:
            return []
        n = max_new_tokens or self.max_new_tokens
        out: list[str] = []
        with self._multi_use(adapters) as keys:
            for chunk, ck, feats in self._mixed_chunks(samples, keys, vision_states):
                sink = None if on_token is None else functools.partial(_to_row, on_token, len(out))
                with self.base_passes(), self.multi.rows(ck):
                    out += self.mllm.generate(chunk, n, len(chunk), image_features=feats, decoder=self._decoder(),
                                              on_token=sink)
        return out

    def answer_mixture(self, samples: Sequence[Sample], mixtures: Sequence[Mixture], max_new_tokens: int | None = None,
                       vision_states: torch.Tensor | None = None) -> list[str]:
        """Greedy answers where sample ``i`` mixes the adapters of ``mixtures[i]`` with its own weights (soft
        mixtures of LoRA adapters, :mod:`cl_service.engine.mixture`); ``vision_states`` as in :meth:`answer_mixed`."""
        if not samples and not mixtures:
            return []
        return answer_mixture(self, samples, mixtures, max_new_tokens or self.max_new_tokens, vision_states)

    def _decoder(self) -> GraphDecoder | None:
        """The CUDA-graph decoder of the stacked path, when ``cuda_graphs`` is on and the base is on a GPU."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None:
            if self.mllm.device.type != "cuda":
                return None
            with self._multi_lock:
                if self._graphs is None:
                    self._graphs = GraphDecoder(self.mllm, self.multi)
        return self._graphs

    def _mixed_chunks(self, samples: Sequence[Sample], keys: list[str | None], vision_states: torch.Tensor | None):
        """``(samples, adapter keys, image features)`` per batch of ``batch_size`` rows."""
        counts = [len(s.images) for s in samples]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
        for i in range(0, len(samples), self.batch_size):
            chunk, ck = list(samples[i:i + self.batch_size]), keys[i:i + self.batch_size]
            image_keys = [k for k, c in zip(ck, counts[i:i + self.batch_size]) for _ in range(c)]
            vs = None if vision_states is None else vision_states[starts[i]:starts[i + len(chunk)]]
            feats: Any
            if vs is not None and not any(self.multi.is_vision(k) for k in ck):
                feats = self.multi.image_features(None, image_keys, vs)  # no image decoding at all
            else:
                def feats(pixels: torch.Tensor, image_keys=image_keys, vs=vs) -> torch.Tensor:
                    return self.multi.image_features(pixels, image_keys, vs)
            yield chunk, ck, feats

    @torch.no_grad()
    def _last_logits_mixed(self, samples: Sequence[Sample], adapters: Sequence[str | None],
                           vision_states: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits after each prompt ``[B, V]`` (float32, CPU), row ``i`` through ``adapters[i]``."""
        out = []
        with self._multi_use(adapters) as keys:
            for chunk, ck, feats in self._mixed_chunks(samples, keys, vision_states):
                with self.base_passes(), self.multi.rows(ck):
                    batch = self.mllm.collate(chunk, train=False, pixels=not torch.is_tensor(feats))
                    res = self.mllm.model(inputs_embeds=self.mllm.embed(batch, image_features=feats),
                                          attention_mask=batch["attention_mask"].to(self.mllm.device),
                                          position_ids=batch["position_ids"].to(self.mllm.device),
                                          logits_to_keep=1, use_cache=False)
                    out.append(res.logits[:, -1].float().cpu())
        return torch.cat(out)

    def route_mllm(self, samples: Sequence[Sample], router: str, pool: Pool,
                   vision_states: torch.Tensor | None = None) -> list[Route]:
        """Two-stage inference, stage one: the MLLM router's letter for each sample.

        Output that holds no valid letter falls back, deterministically, to the pool letter with the
        highest first-token logit (reported as ``fallback=True``), never to a random expert. Pools past 26
        experts (multi-letter labels, :mod:`cl_service.routers.prompt`) decode at least as many tokens as
        their longest label needs, whatever ``router_max_new_tokens`` says, and fall back to the label of
        the highest summed token log-prob (:func:`cl_service.engine.labels.label_scores`).
        """
        if not samples:
            return []
        items = [router_sample(pool, s, None) for s in samples]
        fused = self.fused_lora or vision_states is not None
        if pool.label_len > 1:
            return route_labels(self, items, router, pool, fused, vision_states)
        ids = torch.tensor([self._letter_ids[L] for L in pool.letters])
        if fused and self.router_max_new_tokens == 1:
            return self._route_one_prefill(items, router, pool, ids, vision_states)
        if fused:
            raws = self.answer_mixed(items, [router] * len(items), self.router_max_new_tokens, vision_states)
        else:
            raws = self._run(router, lambda: self.mllm.generate(items, self.router_max_new_tokens, self.batch_size))
        routes: list[Route | None] = []
        bad = []
        for i, raw in enumerate(raws):
            e = parse_choice(raw, pool)
            routes.append(Route(e, raw, False) if e is not None else None)
            if e is None:
                bad.append(i)
        if bad:
            todo = [items[i] for i in bad]
            logits = (self._last_logits_mixed(todo, [router] * len(todo)) if fused
                      else self._run(router, lambda: self._first_logits(todo)))
            for i, row in zip(bad, logits[:, ids]):
                routes[i] = Route(pool.experts[int(row.argmax())], raws[i], True)
        return routes  # type: ignore[return-value]

    def _route_one_prefill(self, items: list[Sample], router: str, pool: Pool, ids: torch.Tensor,
                           vision_states: torch.Tensor | None) -> list[Route]:
        """Every label one token (``ids``, one per expert): a single prefill gives the output token and the
        fallback logits at once."""
        logits = self._last_logits_mixed(items, [router] * len(items), vision_states)
        raws = [t.strip() for t in self.mllm.tokenizer.batch_decode(logits.argmax(-1)[:, None],
                                                                   skip_special_tokens=True)]
        routes = []
        for raw, row in zip(raws, logits):
            e = parse_choice(raw, pool)
            routes.append(Route(e, raw, False) if e is not None
                          else Route(pool.experts[int(row[ids].argmax())], raw, True))
        return routes

    @torch.no_grad()
    def _first_logits(self, items: list[Sample]) -> torch.Tensor:
        out = []
        for i in range(0, len(items), self.batch_size):
            batch = self.mllm.collate(items[i:i + self.batch_size], train=False)
            out.append(self.mllm.forward(batch).logits[:, -1].float().cpu())
        return torch.cat(out)

    def question_features(self, samples: Sequence[Sample]) -> np.ndarray:
        """Base-model routing features ``[B, H_text + H_vision]`` (the ridge router's input)."""
        def compute(todo: list[Sample]) -> list[np.ndarray]:
            with self.base_passes():
                return list(self.mllm.question_features(todo, self.batch_size).numpy())

        return np.stack(self._memo.map(("question_features",), samples, compute))

    @property
    def text_dim(self) -> int:
        """Width of the question half of :meth:`routing_features` (the decoder's hidden size)."""
        return self.mllm.hidden_size

    def routing_features(self, samples: Sequence[Sample], vision_states: torch.Tensor | None = None) -> np.ndarray:
        """Base-model routing features ``[B, H_text + H_vision]``: the question alone, next to the images
        (the nearest-neighbour router's input; :meth:`MLLM.routing_features`). ``vision_states`` as in
        :meth:`answer_mixed`: with them, routing is one short text-only base pass (no CLIP, no image tokens)."""
        return self._base_features("routing_features", self.mllm.routing_features, samples, vision_states)

    def features(self, samples: Sequence[Sample], vision_states: torch.Tensor | None = None) -> np.ndarray:
        """Pooled base-model features ``[B, H]`` (the prototype router's input); ``vision_states`` as in
        :meth:`answer_mixed`."""
        return self._base_features("features", self.mllm.pooled_features, samples, vision_states)

    def _base_features(self, kind: str, fn, samples: Sequence[Sample], vision_states: torch.Tensor | None) -> np.ndarray:
        """``fn(samples, batch_size, vision_states)`` of the plain base, stacked; memoised per sample unless the
        batch brings its own CLIP states (then one call over all of it)."""
        bs = max(self.batch_size, len(samples)) if vision_states is not None else self.batch_size

        def compute(todo: list[Sample]) -> list[np.ndarray]:
            with self.base_passes():
                return list(fn(todo, bs, vision_states).numpy())

        if vision_states is not None or self._memo.active() is None:
            return np.stack(compute(list(samples)))
        return np.stack(self._memo.map((kind,), samples, compute))

    # ------------------------------------------------------------------ memo
    def enable_memo(self) -> None:
        """Memoise deterministic results (answers per adapter content, sample and ``max_new_tokens``; base
        features per sample) for the life of this engine (:mod:`cl_service.engine.memo`)."""
        self._memo.enable()

    def memo_off(self):
        """Compute everything afresh inside the block (e.g. to time routing honestly); this thread's calls only."""
        return self._memo.off()

    @property
    def memo(self) -> dict | None:
        """The memoised results (None: off)."""
        return self._memo.store

    @memo.setter
    def memo(self, store: dict | None) -> None:
        self._memo.store = store


def _to_row(on_token: Sequence[Callable[[int], None] | None], at: int, r: int, t: int) -> None:
    """Row ``r`` of a batch starting at sample ``at``: its token to that sample's ``on_token``, if any."""
    if on_token[at + r] is not None:
        on_token[at + r](t)


def _meta_digest(key: str) -> str | None:
    """sha256 of an adapter folder's ``adapter.json`` (None when it is missing): what says a cached copy is stale."""
    meta = Path(key) / ADAPTER_META
    return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None
