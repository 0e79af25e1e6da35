"""MLLM routing over pools of multi-letter labels (past 26 experts, :mod:`cl_service.routers.prompt`).

A label may take several tokens, so the router decodes at least as many tokens as the pool's longest label
needs: ``router.max_new_tokens`` is raised for such pools, not rejected (a run that starts with
``router.max_new_tokens=1`` keeps working when its pool grows past 26 experts). The one-prefill fast path
of :meth:`Engine.route_mllm` is kept for pools whose every label is a single token. Output holding no valid
label falls back to the label of the highest summed token log-prob (:func:`label_scores`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from cl_service.data.schema import Sample
from cl_service.routers.base import Route
from cl_service.routers.prompt import Pool, parse_choice

if TYPE_CHECKING:
    from cl_service.engine.engine import Engine


def route_labels(eng: "Engine", items: list[Sample], router: str, pool: Pool, fused: bool,
                 vision_states: torch.Tensor | None) -> list[Route]:
    """:meth:`Engine.route_mllm` for a pool of multi-letter labels; ``items`` are its router samples."""
    toks = [label_tokens(eng, L) for L in pool.letters]
    n = max(eng.router_max_new_tokens, max(len(t) for t in toks))
    if fused and n == 1:
        return eng._route_one_prefill(items, router, pool, torch.tensor([t[0] for t in toks]), vision_states)
    if fused:
        raws = eng.answer_mixed(items, [router] * len(items), n, vision_states)
    else:
        raws = eng._run(router, lambda: eng.mllm.generate(items, n, eng.batch_size))
    chosen = [parse_choice(raw, pool) for raw in raws]
    bad = [i for i, e in enumerate(chosen) if e is None]
    out = [Route(e, raw, False) for e, raw in zip(chosen, raws)]
    if bad:
        scores = label_scores(eng, [items[i] for i in bad], router, pool, fused)
        for j, i in enumerate(bad):
            out[i] = Route(pool.experts[int(scores[j].argmax())], raws[i], True)
    return out


def label_tokens(eng: "Engine", label: str) -> tuple[int, ...]:
    """The tokens the base emits for ``label`` right after a prompt (a bare ``▁``/``Ġ`` before it included)."""
    if label not in eng._label_cache:
        ids, n = eng.mllm.encode(Sample("?", "test", "label", [], "?", [label], "exact"), with_target=True)
        eng._label_cache[label] = _label_prefix(eng.mllm.tokenizer, ids[n:], label)
    return eng._label_cache[label]


@torch.no_grad()
def label_scores(eng: "Engine", items: list[Sample], router: str, pool: Pool, fused: bool) -> torch.Tensor:
    """Sum of the router's token log-probs of every label of ``pool`` after each router sample's prompt:
    ``[B, K]`` float32 (row ``b`` for ``items[b]``, column ``k`` for ``pool.letters[k]``).

    Teacher-forced, with each label tokenized as in its own training target after that prompt. Labels that
    share all tokens but their last (``AA`` .. ``AZ`` when each is ``A`` + one letter token) are scored from one
    row, so a two-letter pool costs about one row per first letter, not one per expert. The sum, not the
    mean: it is the log-probability of the label's text, and a label that takes fewer tokens is not favoured
    or penalised by averaging. Greedy first-token-then-second scoring would be cheaper still but can pick a
    label whose first letter is likely while every continuation of it is not.
    """
    scores = torch.full((len(items), len(pool.letters)), float("-inf"))
    rows: list[tuple[int, Sample, int, list[tuple[int, tuple[int, ...]]]]] = []  # (item, row, prompt len, labels)
    for b, item in enumerate(items):
        groups: dict[tuple, tuple[Sample, int, list[tuple[int, tuple[int, ...]]]]] = {}
        for k, label in enumerate(pool.letters):
            row = dataclasses.replace(item, answers=[label])
            ids, n = eng.mllm.encode(row, with_target=True)
            toks = _label_prefix(eng.mllm.tokenizer, ids[n:], label)
            groups.setdefault((n, toks[:-1]), (row, n, []))[2].append((k, toks))
        rows += [(b, row, n, labels) for row, n, labels in groups.values()]
    steps = max(len(t) for *_, labels in rows for _, t in labels)
    m = eng.mllm

    def run(chunk: list[Sample], at: list[int], feats: Any = None) -> torch.Tensor:
        """Logits ``[b, steps, V]`` from position ``at[i] - 1`` on in each (right-padded) row, clamped to its end."""
        batch = m.collate(chunk, train=True, pixels=not torch.is_tensor(feats))
        last = batch["input_ids"].shape[1] - 1
        keep = torch.tensor([[min(n - 1 + j, last) for j in range(steps)] for n in at]).to(m.device)
        h = m.model.model.language_model(inputs_embeds=m.embed(batch, image_features=feats),
                                         attention_mask=batch["attention_mask"].to(m.device),
                                         position_ids=batch["position_ids"].to(m.device), use_cache=False).last_hidden_state
        # the head only at the kept positions (per row; transformers < 5.20 takes no 2-D logits_to_keep)
        return m.model.lm_head(torch.take_along_dim(h, keep[..., None], dim=1)).float().cpu()

    samples, at, bs = [r[1] for r in rows], [r[2] for r in rows], eng.batch_size
    logits: list[torch.Tensor] = []
    if fused:
        with eng._multi_use([router] * len(samples)) as keys:
            for i, (chunk, ck, feats) in enumerate(eng._mixed_chunks(samples, keys, None)):
                with eng.base_passes(), eng.multi.rows(ck):
                    logits += list(run(chunk, at[i * bs:i * bs + len(chunk)], feats))
    else:
        logits = eng._run(router, lambda: [x for i in range(0, len(samples), bs)
                                           for x in run(samples[i:i + bs], at[i:i + bs])])
    for (b, *_, labels), lg in zip(rows, logits):
        lp = torch.log_softmax(lg, dim=-1)  # row j predicts target token j
        for k, toks in labels:
            scores[b, k] = lp[torch.arange(len(toks)), torch.tensor(toks)].sum()
    return scores


def _label_prefix(tokenizer: Any, target: list[int], label: str) -> tuple[int, ...]:
    """The shortest start of ``target`` (a label's encoded target: the label, then end-of-answer tokens) whose
    text holds ``label``; all of ``target`` if none does."""
    for k in range(1, len(target) + 1):
        if label in tokenizer.decode(target[:k]):
            return tuple(target[:k])
    return tuple(target)
