import pytest
import torch

from cl_service.data.schema import Sample
from cl_service.data.shards import ShardDataset
from cl_service.models.mllm import load_mllm

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mllm(tiny_base):
    torch.set_num_threads(1)
    return load_mllm(tiny_base)


@pytest.fixture(scope="module")
def samples(dcl_shards):
    ds = ShardDataset(dcl_shards)
    return ds.samples("AD", "train")[:3] + ds.samples("Fin", "test")[:3]


def test_collate_and_finite_loss(mllm, samples):
    batch = mllm.collate(samples, train=True)
    B, L = batch["input_ids"].shape
    assert B == 6 and batch["labels"].shape == (B, L) and batch["pixel_values"].shape[0] == 6
    assert (batch["labels"] != -100).any(dim=1).all()  # every sample has answer tokens to learn
    loss = mllm.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0


def test_generate_is_deterministic_and_batched_like_single(mllm, samples):
    a = mllm.generate(samples, max_new_tokens=4, batch_size=6)
    b = mllm.generate(samples, max_new_tokens=4, batch_size=2)
    assert a == b and len(a) == 6 and all(isinstance(x, str) for x in a)


def test_save_load_round_trip_identical_logits(mllm, samples, tmp_path):
    mllm.save(tmp_path / "copy")
    again = load_mllm(tmp_path / "copy")
    batch = mllm.collate(samples, train=False)
    with torch.no_grad():
        assert torch.equal(mllm.forward(batch).logits, again.forward(batch).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # atomic save leaves no temp folder


def test_corrupt_image_is_a_clear_error(mllm, samples):
    bad = Sample("RS", "test", "broken-7", [b"\x89PNG\r\n\x1a\nnot really"], "q?", ["yes"], "rs")
    with pytest.raises(ValueError, match="sample 'broken-7': image 0 does not decode"):
        mllm.collate([samples[0], bad], train=False)


def test_load_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint"):
        load_mllm(tmp_path)
