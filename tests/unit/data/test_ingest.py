import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cl_service.cli import main
from cl_service.data.export import export_mllm_cl
from cl_service.data.ingest import IngestError, ingest
from cl_service.data.shards import ShardDataset

pytestmark = pytest.mark.timeout(120)


def _img(path: Path, color=(0, 128, 255), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def _layout(root: Path) -> Path:
    """A two-task release in the official layout, with a multi-image record, an answer list and router file."""
    _img(root / "RS/images/a.png")
    _img(root / "RS/images/b.jpg", (9, 9, 9), "JPEG")
    _img(root / "RS/images/sub/c.png", (1, 2, 3))
    train = [
        {"id": "t1", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nIs there water?"}, {"from": "gpt", "value": "yes"},
                           {"from": "human", "value": "How many roads?"}, {"from": "gpt", "value": "2"}]},
        {"id": "t2", "image": ["a.png", "sub/c.png"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nSame place?"}, {"from": "gpt", "value": "no"}]},
    ]
    test = [{"question_id": "q1", "image": "b.jpg", "text": "Is it dark?", "answer": "yes"},
            {"question_id": "q2", "image": "sub/c.png", "text": "Read it", "answer": ["abc", "ABC"],
             "answer_type": "Regular Text Recognition"}]
    (root / "RS/train.json").write_text(json.dumps(train))
    (root / "RS/test.json").write_text(json.dumps(test))
    _img(root / "MyTask/images/x.png", (200, 0, 0))
    (root / "MyTask/test.json").write_text(json.dumps([{"question_id": 7, "image": "x.png", "text": "Colour?",
                                                        "answer": "red"}]))
    router = [{"id": "r1", "image": "RS/images/a.png",
               "conversations": [{"from": "human", "value": "<image>\nWhich expert?"}, {"from": "gpt", "value": "A"}]}]
    (root / "task2Router_train1.json").write_text(json.dumps(router))
    return root


def test_ingest_official_layout(tmp_path):
    root = _layout(tmp_path / "release")
    m = ingest(root, ["RS", "MyTask"], tmp_path / "ds")
    ds = ShardDataset(tmp_path / "ds")
    assert ds.tasks == ["RS", "MyTask"]
    assert m["counts"]["RS"] == {"train": 3, "test": 2}
    assert m["counts"]["_router"] == {"task2Router_train1": 1}
    scorers = {t["name"]: t["scorer"] for t in m["tasks"]}
    assert scorers["RS"] == "rs" and scorers["MyTask"] == "contains"  # documented default for unknown tasks
    train = ds.samples("RS", "train")
    assert [s.id for s in train] == ["t1", "t1#1", "t2"]
    assert train[0].question == "Is there water?" and train[0].answers == ["yes"]
    assert train[1].question == "How many roads?" and train[1].answers == ["2"]
    assert len(train[2].images) == 2 and train[2].question == "Same place?"
    test = ds.samples("RS", "test")
    assert test[0].images[0][:3] == b"\xff\xd8\xff"  # JPEG kept as is
    assert test[1].answers == ["abc", "ABC"] and test[1].metadata == {"answer_type": "Regular Text Recognition"}
    assert ds.samples("MyTask", "test")[0].id == "7"


def test_scorer_override_and_unknown_scorer(tmp_path):
    root = _layout(tmp_path / "release")
    m = ingest(root, ["RS", "MyTask"], tmp_path / "ds", scorers={"MyTask": "exact"})
    assert {t["name"]: t["scorer"] for t in m["tasks"]}["MyTask"] == "exact"
    rc = main(["data", "ingest", "--root", str(root), "--tasks", "RS", "--out", str(tmp_path / "d2"),
               "--scorer", "RS=nope"])
    assert rc == 2 and not (tmp_path / "d2").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: (r / "RS/images/b.jpg").unlink(), "RS/test.json record 0 (id=q1): image 'b.jpg' not found"),
        (lambda r: (r / "RS/images/b.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage"), "record 0 (id=q1): image 'b.jpg'"),
        (lambda r: (r / "RS/images/a.png").write_bytes((r / "RS/images/a.png").read_bytes()[:40]),
         "train.json record 0 (id=t1): image 'a.png'"),
        (lambda r: _edit(r / "RS/test.json", lambda d: d[1].pop("text")), "test.json record 1 (id=q2): record has no 'text'"),
        (lambda r: _edit(r / "RS/train.json", lambda d: d[1].update(conversations=[{"from": "gpt"}])),
         "train.json record 1 (id=t2): 'conversations'"),
        (lambda r: _edit(r / "RS/test.json", lambda d: d[0].update(image="../../etc/passwd")), "must be relative"),
        (lambda r: (r / "RS/test.json").write_text("[{bad json"), "RS/test.json: not valid JSON"),
        (lambda r: (r / "RS/test.json").write_text('{"a": 1}'), "expected a JSON list"),
        (lambda r: [(r / "MyTask/test.json").write_text("[]")], "task MyTask: no usable records"),
        (lambda r: (r / "MyTask/test.json").unlink(), "task MyTask: neither"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, mutate, message):
    root = _layout(tmp_path / "release")
    mutate(root)
    with pytest.raises(IngestError) as e:
        ingest(root, ["RS", "MyTask"], tmp_path / "ds")
    assert message in str(e.value)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["release"]  # no staging folder left behind


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_skip_bad_counts_in_manifest(tmp_path):
    root = _layout(tmp_path / "release")
    (root / "RS/images/b.jpg").write_bytes(b"not an image")
    m = ingest(root, ["RS", "MyTask"], tmp_path / "ds", skip_bad=True)
    assert m["counts"]["RS"]["test"] == 1
    assert m["skipped"] == {"RS": {"test": 1}}
    assert "b.jpg" in m["skipped_examples"][0]


def test_cli_error_has_no_traceback(tmp_path, capsys):
    root = _layout(tmp_path / "release")
    (root / "RS/images/a.png").unlink()
    rc = main(["data", "ingest", "--root", str(root), "--tasks", "RS,MyTask", "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("clsvc: error: ") and "Traceback" not in err and "a.png" in err and "--skip-bad" in err
    rc = main(["data", "ingest", "--root", str(root), "--tasks", "Nope", "--out", str(tmp_path / "ds")])
    assert rc == 2 and "folders under root" in capsys.readouterr().err


def test_round_trip_through_official_layout(tmp_path, dcl_shards):
    export_mllm_cl(dcl_shards, tmp_path / "release")
    src = ShardDataset(dcl_shards)
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == sorted(src.tasks)
    ingest(tmp_path / "release", src.tasks, tmp_path / "back")
    back = ShardDataset(tmp_path / "back")
    assert back.tasks == src.tasks
    for task in src.tasks:
        assert back.task_meta(task)["scorer"] == src.task_meta(task)["scorer"]
        for split in ("train", "test"):
            a = sorted(src.iter_samples(task, split), key=lambda s: s.id)
            b = sorted(back.iter_samples(task, split), key=lambda s: s.id)
            assert a == b, (task, split)


def test_inspect_verifies_checksums(tmp_path, capsys, dcl_shards):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dcl_shards, ds)
    assert main(["data", "inspect", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "checksums ok" in out and "RS" in out and "Fin" in out
    shard = sorted((ds / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert main(["data", "inspect", str(ds)]) == 1
    assert "CORRUPT" in capsys.readouterr().err


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(monkeypatch):
    import io

    from PIL import Image

    from cl_service.data.images import BadImage, validate_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # the image is now 4x over twice the limit
    with pytest.raises(BadImage, match="DecompressionBombError"):
        validate_image(buf.getvalue())
