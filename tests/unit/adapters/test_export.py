"""``clsvc adapters export``: a plain peft folder that ``PeftModel.from_pretrained`` loads onto the base, and a
merged llava-hf checkpoint, each answering what the engine answers; MoE-LoRA refused with the reason."""

import json

import pytest
import torch

from cl_service.adapters.export import EXPORT_META, export_adapter, export_run
from cl_service.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraCfg, attach_lora, remove_lora, save_adapter
from cl_service.adapters.moelora import MOELORA_CONFIG, MoELoRASpec, attach_moelora, detach_moelora, save_moelora
from cl_service.adapters.registry import AdapterError, finalize_adapter
from cl_service.cli import main
from cl_service.data.shards import ShardDataset
from cl_service.models.mllm import load_mllm

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def run(tiny_base, dcl_shards, tmp_path_factory):
    """A results folder with one expert (LoRA on decoder and CLIP Linears + its own projector copy, perturbed so
    its answers are not the base's) and one MoE-LoRA, as a run publishes them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    m = load_mllm(tiny_base)
    params = attach_lora(m, LoraCfg(rank=4, alpha=8.0, dropout=0.0, vision=True), "e", seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:  # LoRA A/B and every projector weight and bias
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.05))
    finalize_adapter(save_adapter(m, root / "adapters" / "expert" / "RS", "e"), id="expert:RS", kind="expert",
                     task="RS", description="", base=str(tiny_base), job_key="k")
    remove_lora(m)
    attach_moelora(m, MoELoRASpec.of(LoraCfg(rank=4, alpha=8, dropout=0.0, targets=("q", "v")), experts=2), seed=2)
    finalize_adapter(save_moelora(m, root / "adapters" / "moelora" / "stage-0-RS"), id="moelora:stage-0", kind="moelora",
                     task="RS", description="", base=str(tiny_base), job_key="m")
    detach_moelora(m)
    (root / "config.resolved.json").write_text(json.dumps(
        {"tasks": ["RS", "Med"], "base": str(tiny_base), "dataset": str(dcl_shards), "base_dtype": None,
         "config": {"base": {"prompt_style": "auto"}}}))
    return root


@pytest.fixture(scope="module")
def expected(run, tiny_base, dcl_shards):
    """The engine's answers with the expert, and the plain base's."""
    from cl_service.engine.engine import Engine

    ds = ShardDataset(dcl_shards)
    samples = ds.samples("RS", "test")[:4] + ds.samples("Med", "test")[:4]
    engine = Engine(tiny_base)
    answers = engine.answer(samples, str(run / "adapters" / "expert" / "RS"), max_new_tokens=6)
    plain = engine.answer(samples, None, max_new_tokens=6)
    assert answers != plain  # the expert changes answers: equal answers below are evidence
    return samples, answers


def test_peft_export_loads_with_peft_from_pretrained_and_answers_as_the_engine(run, tiny_base, expected, tmp_path):
    from peft import PeftModel

    samples, answers = expected
    assert main(["adapters", "export", str(run), "--format", "peft", "--expert", "RS", "--out", str(tmp_path / "p")]) == 0
    out = tmp_path / "p"
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_META])
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["multi_modal_projector"]
    assert cfg["base_model_name_or_path"] == str(tiny_base.resolve())
    record = json.loads((out / EXPORT_META).read_text())
    assert record["adapter"]["id"] == "expert:RS" and record["lora_only"] is False

    m = load_mllm(tiny_base)  # a plain LlavaForConditionalGeneration, and peft's own loader, nothing of ours
    peft_model = PeftModel.from_pretrained(m.model, str(out), local_files_only=True)
    assert peft_model.base_model.model is m.model  # peft wrapped the model our generate() runs
    assert m.generate(samples, max_new_tokens=6) == answers


def test_merged_export_is_a_plain_checkpoint_that_answers_as_the_engine(run, tiny_base, expected, tmp_path):
    from transformers import LlavaForConditionalGeneration

    samples, answers = expected
    [out] = export_run(run, "merged", tmp_path / "m", expert="expert:RS")
    assert not (out / ADAPTER_CONFIG).exists() and (out / "config.json").is_file()
    assert json.loads((out / EXPORT_META).read_text())["dtype"] == "float32"
    hf = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_base, local_files_only=True)
    w = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(hf.state_dict()[w], base.state_dict()[w])  # the expert's projector, not the base's
    merged = load_mllm(out)
    assert merged.generate(samples, max_new_tokens=6) == answers


def test_every_expert_by_default_and_moelora_refused_with_the_reason(run, tmp_path):
    [out] = export_run(run, "peft", tmp_path / "all")
    assert out == tmp_path / "all" / "RS" and (out / ADAPTER_WEIGHTS).is_file()  # Med has no expert yet
    with pytest.raises(FileExistsError):
        export_run(run, "peft", tmp_path / "all")
    spec = json.loads((run / "adapters" / "moelora" / "stage-0-RS" / MOELORA_CONFIG).read_text())
    assert spec["method"] == "moelora" and spec["experts"] == 2 and spec["peft_compatible"] is False
    for fmt in ("peft", "merged"):
        with pytest.raises(ValueError, match="MoE-LoRA .*token.*not a plain peft LoRA"):
            export_run(run, fmt, tmp_path / fmt, expert="moelora:stage-0")
        assert not (tmp_path / fmt).exists()
    with pytest.raises(AdapterError, match="known: expert:RS, moelora:stage-0"):
        export_run(run, "peft", tmp_path / "x", expert="Fin")
    with pytest.raises(ValueError, match="unknown export format"):
        export_adapter(run / "adapters" / "expert" / "RS", run, "gguf", tmp_path / "g")


def test_a_merging_methods_stage_exports_as_the_stacked_peft_lora_and_answers_as_the_engine(run, tiny_base, expected,
                                                                                             tmp_path):
    """A SEFE / KeepLoRA stage (the model merged after every task, kept as one LoRA of stacked blocks: here the
    expert's block and a second one) exports to peft as it is: ``PeftModel`` loads the rank-8 LoRA and answers what
    the engine answers with the stage; the family's own files (key positions) stay behind."""
    import shutil

    from peft import PeftModel

    from cl_service.adapters.merged import attach_stacked
    from cl_service.engine.engine import Engine

    samples, answers = expected
    root = tmp_path / "run"
    shutil.copytree(run, root)
    m = load_mllm(tiny_base)
    _, found = attach_stacked(m, run / "adapters" / "expert" / "RS", LoraCfg(rank=4, alpha=8.0, dropout=0.0, vision=True),
                              "job", seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in found:
            b.B[:, 4:].add_(torch.randn(b.B[:, 4:].shape, generator=g) * 0.3)
    stage = save_adapter(m, root / "adapters" / "sefe" / "stage-1-Med", "job")
    (stage / "sefe_key_positions.safetensors").write_bytes(b"the family's own file")
    finalize_adapter(stage, id="sefe:stage-1", kind="sefe", task="Med", description="sefe after Med",
                     base=str(tiny_base), job_key="s")
    engine = Engine(tiny_base)
    mine = engine.answer(samples, str(stage), max_new_tokens=6)
    assert mine != answers  # the second block changes answers: equal answers below are evidence

    [out] = export_run(root, "peft", tmp_path / "p", expert="sefe:stage-1")
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_META])
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 8
    plain = load_mllm(tiny_base)
    PeftModel.from_pretrained(plain.model, str(out), local_files_only=True)
    assert plain.generate(samples, max_new_tokens=6) == mine
