"""`clsvc data ingest` and `clsvc base build` SIGKILLed half-way through writing, then run again: what they
left is never taken for a dataset or a base, readers say so clearly, and the rerun completes and cleans up."""

import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def _clsvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "cl_service.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


# `clsvc base build` of the tiny model with its recipe cut to what 3 steps of 8 use (24 generated samples, a tokenizer
# from 10 samples per task): the same model, so the same weights to save (the window the kill aims at), in ~5 s
# instead of ~13 s per build. Registered under a name of its own through the public registries, then the CLI's main.
_QUICK_BUILD = ("import sys; from cl_service.models import pretrain; from cl_service.models.config import PROFILES; "
                "PROFILES.register('tiny-quick', PROFILES.get('tiny')); pretrain.PRETRAIN.register('tiny-quick', "
                "pretrain.PretrainCfg(batch_size=8, samples=24, tokenizer_samples=10)); "
                "from cl_service.cli import main; sys.exit(main())")


def _staging(folder: Path) -> list[Path]:
    """Hidden entries next to ``folder`` that a writer of it stages in (``.<name>.partial-<pid>``, ...)."""
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and
                  not p.name.endswith(".lock") or p.name.startswith(f"..{folder.name}."))


def _release(root: Path, n: int) -> None:
    """A release in the official layout: two tasks of ``n`` train and ``n`` test records, one image each."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 255)).save(buf, format="PNG")
    for task in ("RS", "Med"):
        (root / task / "images").mkdir(parents=True)
        for i in range(n):
            (root / task / "images" / f"{i}.png").write_bytes(buf.getvalue())
        train = [{"id": f"t{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"answer {i}"}]}
            for i in range(n)]
        test = [{"question_id": f"q{i}", "image": f"{i}.png", "text": f"Question {i}?", "answer": f"answer {i}"}
                for i in range(n)]
        (root / task / "train.json").write_text(json.dumps(train))
        (root / task / "test.json").write_text(json.dumps(test))


def test_a_killed_ingest_leaves_no_dataset_and_the_rerun_writes_it_whole(spawn, tmp_path):
    from cl_service.data.shards import DatasetError, ShardDataset

    _release(tmp_path / "release", 600)
    out = tmp_path / "ds"
    cmd = _clsvc("data", "ingest", "--root", str(tmp_path / "release"), "--tasks", "RS,Med", "--out", str(out),
                 "--shard-size", "10")
    p = spawn(cmd, env=_env(), cwd=str(REPO))
    # killed once its first shards are written
    p.wait_for(lambda: any(any((s / "shards").glob("*")) for s in _staging(out) if (s / "shards").is_dir()),
               timeout=120, poll_s=0.002)
    p.signal(signal.SIGKILL, group=True)
    assert p.finish(timeout=30) == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(DatasetError, match="no manifest.json"):
        ShardDataset(out)
    (half,) = _staging(out)  # the half-written folder: shards but no manifest, and readers refuse it
    assert any((half / "shards").iterdir())
    with pytest.raises(DatasetError, match="no manifest.json"):
        ShardDataset(half)

    p = spawn(cmd, env=_env(), cwd=str(REPO))  # the same command again
    assert p.finish(timeout=120) == 0, p.output()[-3000:]
    ds = ShardDataset(out)
    assert ds.manifest["counts"] == {"RS": {"train": 600, "test": 600}, "Med": {"train": 600, "test": 600}}
    assert ds.verify() == [] and _staging(out) == []  # the killed writer's staging folder is gone too


def test_a_killed_base_build_leaves_no_base_and_the_rerun_builds_it(spawn, tmp_path):
    from cl_service.models.mllm import load_mllm
    from cl_service.models.store import is_valid_base

    out = tmp_path / "store" / "tiny"
    cmd = [sys.executable, "-c", _QUICK_BUILD, "base", "build", "--profile", "tiny-quick", "--steps", "3",
           "--out", str(out)]
    p = spawn(cmd, env=_env(), cwd=str(REPO))
    # killed while it saves the trained weights (its staging folder has appeared)
    p.wait_for(lambda: out.parent.is_dir() and bool(_staging(out)), timeout=150, poll_s=0.001)
    p.signal(signal.SIGKILL, group=True)
    assert p.finish(timeout=30) == -signal.SIGKILL
    assert _staging(out) and not out.exists() and not is_valid_base(out)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_mllm(out)  # a run given base.path=<it> stops with this message

    p = spawn(cmd, env=_env(), cwd=str(REPO))
    assert p.finish(timeout=150) == 0, p.output()[-3000:]
    assert is_valid_base(out) and _staging(out) == []
    meta = json.loads((out / "base.json").read_text())
    assert meta["pretrain"]["steps"] == 3 and meta["pretrain"]["samples"] == 24 and meta["profile"] == "tiny"
