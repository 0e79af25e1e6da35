"""Cross-adapter batching: a mixed batch answers exactly as each adapter alone (peft) would."""

from __future__ import annotations

import pytest
import torch

from cl_service.engine.engine import Engine
from cl_service.engine.multilora import MultiLoRA, RowPlan
from cl_service.models.mllm import load_mllm
from cl_service.routers.prompt import Pool

pytestmark = pytest.mark.timeout(180)


def test_mixed_answers_equal_per_adapter_answers(tiny_base, adapters, samples):
    plain = Engine(tiny_base)  # peft, one adapter at a time: the reference
    plan = [None, "e1", "e2", "e3", "vis", "e1", "e3", "e2", None, "e1"]
    folders = [adapters[k] if k else None for k in plan]
    ref = {k: plain.answer(samples, adapters[k] if k else None, 6) for k in set(plan)}
    assert len({tuple(v) for v in ref.values()}) >= 3, "adapters should change the answers (else nothing is tested)"
    expected = [ref[k][i] for i, k in enumerate(plan)]

    mixed = Engine(tiny_base)
    mixed.batch_size = 4  # several chunks; prefill takes the gather path, decode (B=4 < S=5) too
    assert mixed.answer_mixed(samples, folders, 6) == expected
    mixed.batch_size = 64  # one chunk of 10 rows >= 5 slots: decode takes the all-slots (one-hot) path
    assert mixed.answer_mixed(samples, folders, 6) == expected
    # CLIP states computed once and reused (the vision-LoRA adapter recomputes its own)
    vs = mixed.vision_states(samples)
    assert mixed.answer_mixed(samples, folders, 6, vision_states=vs) == expected
    # one adapter for the whole batch: the uniform fast path
    assert mixed.answer_mixed(samples, [adapters["e2"]] * len(samples), 6) == ref["e2"]


def test_mixed_logits_match_peft(tiny_base, adapters, samples):
    """Row-wise logits of one mixed forward equal the per-adapter peft forward (float32: ~1e-6)."""
    eng = Engine(tiny_base)
    plan = ["e1", None, "e2", "vis", "e3"]
    batch = eng.mllm.collate(samples[:5], train=False)
    ref = []
    for i, k in enumerate(plan):
        with torch.no_grad():
            ref.append(eng._run(adapters[k] if k else None, lambda: eng.mllm.forward(batch).logits[i]))
    ml = MultiLoRA(eng.mllm)
    for k in adapters:
        ml.load(k, adapters[k])
    image_keys = plan  # one image per sample
    with torch.no_grad(), eng.mllm.adapters_disabled(), ml.rows(plan):
        feats = ml.image_features(batch["pixel_values"], image_keys)
        got = eng.mllm.model(inputs_embeds=eng.mllm.embed(batch, image_features=feats),
                             attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    for i in range(len(plan)):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-4)


def test_fused_engine_routes_like_peft(tiny_base, adapters, samples):
    pool = Pool(("e1", "e2", "e3"), ("a: first", "b: second", "c: third"))
    ref = Engine(tiny_base).route_mllm(samples, adapters["e1"], pool)
    fused = Engine(tiny_base, fused_lora=True)
    assert fused.route_mllm(samples, adapters["e1"], pool) == ref
    assert fused.route_mllm(samples, adapters["e1"], pool, vision_states=fused.vision_states(samples)) == ref
    assert fused.answer(samples, adapters["e3"], 5) == Engine(tiny_base).answer(samples, adapters["e3"], 5)
    # one-letter routers: one prefill gives the letter and, when it is no pool letter, the fallback
    plain1, fused.router_max_new_tokens = Engine(tiny_base), 1
    plain1.router_max_new_tokens = 1
    ref1 = plain1.route_mllm(samples, adapters["e2"], pool)
    assert fused.route_mllm(samples, adapters["e2"], pool, vision_states=fused.vision_states(samples)) == ref1
    assert any(r.fallback for r in ref1) or len({r.expert for r in ref1}) > 1


def test_bad_input(tiny_base, adapters, samples, tmp_path):
    eng = Engine(tiny_base)
    with pytest.raises(ValueError, match="2 samples but 1 adapters"):
        eng.answer_mixed(samples[:2], [None])
    from cl_service.adapters.registry import AdapterError
    with pytest.raises(AdapterError):
        eng.answer_mixed(samples[:1], [str(tmp_path)])
    assert eng.answer_mixed([], []) == []


def test_delta_paths_equal_per_row_reference():
    """The three LoRA-update paths (uniform, gather, one-hot) equal a per-row loop, float32."""
    torch.manual_seed(0)
    S, r, d_in, d_out, B = 4, 3, 10, 6, 5
    ml = MultiLoRA.__new__(MultiLoRA)
    A, Bt = torch.randn(S * r, d_in), torch.randn(S * r, d_out)
    idx = torch.tensor([0, 3, 1, 3, 2])
    oh = torch.zeros(B, S)
    oh[torch.arange(B), idx] = 1
    plan = RowPlan(stacks={}, rank=r, vision=False, idx=idx, uniform=None, onehot=oh.repeat_interleave(r, 1).unsqueeze(1))

    def ref(x, rows):
        return torch.stack([x[b] @ A.view(S, r, d_in)[rows[b]].T @ Bt.view(S, r, d_out)[rows[b]] for b in range(B)])

    for L in (1, 4):  # one-hot (decode, B >= S) and gather (prefill)
        x = torch.randn(B, L, d_in)
        torch.testing.assert_close(ml.delta(x, A, Bt, plan=plan), ref(x, idx))
    plan.uniform = 2
    x = torch.randn(B, 4, d_in)
    torch.testing.assert_close(ml.delta(x, A, Bt, plan=plan), ref(x, [2] * B))


def test_preallocated_kv_cache_generates_like_dynamic(tiny_base, samples):
    """Generation with the KV cache in preallocated buffers == transformers' growing (torch.cat) cache."""
    from cl_service.models.generate import growing_cache

    assert growing_cache(8) is not None  # this transformers version takes the preallocated layers
    m = load_mllm(tiny_base)
    fast = m.generate(samples, 7, 4)
    m.preallocate_kv = False
    assert m.generate(samples, 7, 4) == fast


def test_adapters_beyond_the_device_budget_page_through_host_memory(tiny_base, adapters, samples, monkeypatch,
                                                                    tmp_path):
    """Two adapters on the device at once, the others parked in host memory: answers equal those of an engine
    holding them all, and an adapter needed again comes back from host memory without a second read+verify of
    its files; a parked adapter whose files changed is read again."""
    import cl_service.engine.engine as engine_mod

    import shutil

    keys = ["e1", "e2", "e3", "vis"]
    folders = [str(shutil.copytree(adapters[k], tmp_path / k)) for k in keys]  # one is edited below
    rows = [folders[i % len(folders)] for i in range(len(samples))]
    ref = Engine(tiny_base).answer_mixed(samples, rows, 6)

    reads = []
    real_read = engine_mod.read_adapter
    monkeypatch.setattr(engine_mod, "read_adapter", lambda key: (reads.append(key), real_read(key))[1])
    eng = Engine(tiny_base, max_loaded=2, max_host_adapters=8)
    for _ in range(2):  # one adapter per call: the device holds two, so each call pages
        for f in folders:
            idx = [i for i, r in enumerate(rows) if r == f]
            got = eng.answer_mixed([samples[i] for i in idx], [f] * len(idx), 6)
            assert got == [ref[i] for i in idx]
    assert len(reads) == len(folders), "each adapter read and verified once; later loads come from host memory"
    assert eng.paging["disk"] == 4 and eng.paging["host"] == 4 and eng.paging["parked"] >= 6
    assert len(eng.multi.keys()) <= 2 and set(eng.multi.parked) | set(eng.multi.keys()) == {str(p) for p in
                                                                                          map(_resolved, folders)}
    # a mixed batch over all four holds them all for the call; the next call trims back to the budget
    assert eng.answer_mixed(samples, rows, 6) == ref
    eng.answer_mixed(samples[:1], [folders[0]], 6)
    assert len(eng.multi.keys()) == 2 and len(eng.multi.parked) == 2
    # a host copy is valid only for the files it was read from
    parked = eng.multi.parked[0]
    meta = _resolved(parked) / "adapter.json"
    meta.write_text(meta.read_text() + " ")
    eng.forget_missing()
    assert parked not in eng.multi.parked

    nohost = Engine(tiny_base, max_loaded=1, max_host_adapters=0)
    nohost.answer_mixed(samples[:1], [folders[0]], 6)
    nohost.answer_mixed(samples[:1], [folders[1]], 6)
    assert nohost.multi.parked == [] and nohost.paging["dropped"] == 1


def _resolved(p):
    from pathlib import Path

    return Path(p).resolve()


def test_on_token_hands_each_rows_tokens_out_in_a_mixed_batch(tiny_base, adapters, samples):
    """Batch-at-a-time answering's streaming hook: over two engine batches (batch_size 3 for 5 rows), each row's
    ``on_token`` gets its own tokens in order (EOS included, nothing after it), which decode to its answer; a row
    without a callback is answered all the same."""
    from cl_service.engine.engine import Engine

    eng = Engine(tiny_base)
    eng.batch_size = 3
    rows = list(samples[:5])
    folders = [adapters["e1"], None, adapters["e2"], adapters["e3"], adapters["e1"]]
    got: list[list[int]] = [[] for _ in rows]
    sinks = [got[i].append if i != 1 else None for i in range(len(rows))]
    answers = eng.answer_mixed(rows, folders, 6, on_token=sinks)
    assert answers == eng.answer_mixed(rows, folders, 6)
    eos, tok = eng.mllm.eos_id, eng.mllm.tokenizer
    assert got[1] == []
    for i in (0, 2, 3, 4):
        assert 1 <= len(got[i]) <= 6 and eos not in got[i][:-1]
        assert tok.decode([t for t in got[i] if t != eos], skip_special_tokens=True).strip() == answers[i]
