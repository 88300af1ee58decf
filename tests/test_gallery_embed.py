"""dcal embed --output FOLDER (feature shards): the features of dcal embed, a killed run resumed without duplicate
or missing item, unreadable images skipped and named, torchrun's two processes equal to one; then dcal index on
those shards: search equal to dcal search, add embedding only new images."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

pytest.importorskip("faiss")

from dcal.cli import main  # noqa: E402
from dcal.gallery import shards as sh  # noqa: E402
from dcal.gallery.shards import ShardSet  # noqa: E402
from dcal.retrieval import FeatureSet  # noqa: E402
from tests.test_distributed import torchrun  # noqa: E402


def _all(shards: ShardSet) -> FeatureSet:
    parts = list(shards.chunks())
    return FeatureSet(torch.cat([p.features.float() for p in parts]), sum((p.paths for p in parts), []),
                      sum((p.pids for p in parts), []), sum((p.camids for p in parts), []))


def test_shards_hold_the_features_of_dcal_embed_and_fp16_is_close(reid_run, tmp_path):
    run, root = reid_run
    gallery = str(root / "bounding_box_test")
    assert main(["embed", "--run", str(run), gallery, "--output", str(tmp_path / "g.safetensors")]) == 0
    assert main(["embed", "--run", str(run), gallery, "--output", str(tmp_path / "f32"), "--shard-size", "4",
                 "--dtype", "float32"]) == 0
    assert main(["embed", "--run", str(run), gallery, "--output", str(tmp_path / "f16"), "--shard-size", "4"]) == 0
    one = FeatureSet.load(tmp_path / "g.safetensors")
    f32, f16 = ShardSet.open(tmp_path / "f32"), ShardSet.open(tmp_path / "f16")
    assert f32.manifest["num_shards"] == 3 and len(f32) == len(one) == 11
    a, b = _all(f32), _all(f16)
    assert a.paths == one.paths and a.pids == one.pids and a.camids == one.camids
    torch.testing.assert_close(a.features, one.features, atol=1e-5, rtol=1e-5)
    assert next(f16.chunks()).features.dtype == torch.float16
    torch.testing.assert_close(b.features, one.features, atol=2e-3, rtol=2e-3)


def test_a_killed_embedding_resumes_without_duplicate_or_missing_item(reid_run, tmp_path, monkeypatch, capsys):
    run, root = reid_run
    folder = tmp_path / "gallery"
    shutil.copytree(root / "bounding_box_test", folder)
    (folder / "0099_c1s1_000001_00.jpg").write_bytes(b"not an image")  # unreadable: skipped, named, counted
    args = ["embed", "--run", str(run), str(folder), "--output", str(tmp_path / "shards"), "--shard-size", "3",
            "--dtype", "float32"]
    save, written = sh._save_shard, []

    def killed_after_two(features, path):
        if len(written) == 2:
            raise KeyboardInterrupt
        save(features, path)
        written.append(path.name)

    monkeypatch.setattr(sh, "_save_shard", killed_after_two)
    assert main(args) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard-*")) == written
    with pytest.raises(ValueError, match=r"unfinished embedding \(2 of 4 shards\)"):
        ShardSet.open(tmp_path / "shards")
    embedded, part = [], sh._embed_part
    monkeypatch.setattr(sh, "_embed_part", lambda loaded, files, *a: embedded.extend(files) or part(loaded, files, *a))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr()
    assert len(embedded) == 12 - 6 and "resumed" in out.out
    assert "skipped" in out.err and "0099_c1s1_000001_00.jpg" in out.err
    fresh = tmp_path / "fresh"
    assert main([*args[:-5], str(fresh), *args[-4:]]) == 0
    a, b = _all(ShardSet.open(tmp_path / "shards")), _all(ShardSet.open(fresh))
    assert a.paths == b.paths and len(set(a.paths)) == len(a.paths) == 11
    torch.testing.assert_close(a.features, b.features)
    manifest = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert manifest["failed"] == 1 and manifest["count"] == 11 and manifest["complete"]
    # another folder, or other settings, into the same shard set: refused in one line
    (folder / "0098_c2s1_000002_00.jpg").write_bytes((folder / sorted(a.paths)[0].split("/")[-1]).read_bytes())
    assert main(args) == 2
    assert "cannot continue (the images to embed changed" in capsys.readouterr().err


def test_torchrun_two_processes_write_the_shards_of_one(reid_run, tmp_path):
    run, root = reid_run
    gallery = str(root / "bounding_box_test")
    common = [str(run / "best.safetensors") if (run / "best.safetensors").exists() else str(run / "last.pth"),
              gallery, "--shard-size", "2", "--dtype", "float32", "--device", "cpu"]
    res = torchrun(["-m", "dcal", "embed", "--checkpoint", common[0], *common[1:2], "--output",
                    str(tmp_path / "two"), *common[2:]], cwd=tmp_path)
    assert res.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert main(["embed", "--checkpoint", common[0], gallery, "--output", str(tmp_path / "one"), *common[2:]]) == 0
    one, two = ShardSet.open(tmp_path / "one"), ShardSet.open(tmp_path / "two")
    assert one.manifest["num_shards"] == two.manifest["num_shards"] == 6
    a, b = _all(one), _all(two)
    assert a.paths == b.paths and a.pids == b.pids
    torch.testing.assert_close(a.features, b.features, atol=1e-6, rtol=1e-5)


def test_index_on_shards_searches_as_dcal_search_and_add_embeds_only_new_images(reid_run, tmp_path, capsys):
    run, root = reid_run
    out, gal = tmp_path / "out", tmp_path / "gallery"
    shutil.copytree(root / "bounding_box_test", gal)
    assert main(["embed", "--run", str(run), str(gal), "--output", str(out / "g"),
                 "--dtype", "float32"]) == 0
    assert main(["index", "build", str(out / "idx"), str(out / "g")]) == 0
    assert main(["index", "search", str(out / "idx"), "--run", str(run), "--query", str(root / "query"),
                 "--output-dir", str(out / "s1"), "--num-vis", "2"]) == 0
    assert main(["search", "--run", str(run), "--query", str(root / "query"), "--gallery", str(gal),
                 "--output-dir", str(out / "s2"), "--num-vis", "0"]) == 0
    rows = [list(csv.DictReader((out / s / "ranking.csv").open())) for s in ("s1", "s2")]
    keys = ("query", "rank", "gallery", "gallery_pid", "match")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    for a, b in zip(*rows, strict=True):
        assert float(a["distance"]) == pytest.approx(float(b["distance"]), abs=1e-5)
    assert len(list((out / "s1" / "visrank").glob("*.png"))) == 2
    # only cameras 2 (c2 in the names)
    assert main(["index", "search", str(out / "idx"), "--run", str(run), "--query", str(root / "query"),
                 "--output-dir", str(out / "s3"), "--num-vis", "0", "--cameras", "2"]) == 0
    cams = {r["gallery_camid"] for r in csv.DictReader((out / "s3" / "ranking.csv").open())}
    assert cams == {"1"}
    # add: the gallery folder with two new images: only those two are embedded
    for old in sorted(gal.glob("002*_c2s1_*_00.jpg"))[:2]:
        shutil.copy(old, old.with_name(old.name.replace("_00.jpg", "_01.jpg")))
    capsys.readouterr()
    assert main(["index", "add", str(out / "idx"), str(gal), "--run", str(run)]) == 0
    assert "added 2 items" in capsys.readouterr().out
    assert main(["index", "info", str(out / "idx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vectors"] == 13 and info["index"] == "Flat" and info["with_ids"] == 13


def test_versioned_manifests_are_read_by_one_reader_with_one_line_errors(tmp_path):
    from dcal.checkpoint import read_versioned_json

    path = tmp_path / "m.json"
    read = lambda **kw: read_versioned_json(path, "fmt", 2, "thing", **kw)  # noqa: E731
    path.write_text(json.dumps({"format": "fmt", "version": 2}))
    assert read() == {"format": "fmt", "version": 2}
    for text, expected in ((b"{", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[]", "not a thing"),
                           (json.dumps({"format": "other", "version": 1}).encode(), "not a thing"),
                           (json.dumps({"format": "fmt", "version": True}).encode(), "is not an integer"),
                           (json.dumps({"format": "fmt", "version": 3, "dcal_version": "9.0"}).encode(),
                            "written by dcal 9.0 in thing format 3")):
        path.write_bytes(text)
        with pytest.raises(ValueError, match=expected) as e:
            read()
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_text(json.dumps({"format": "fmt", "version": 1, "pad": "x" * 200}))
    with pytest.raises(KeyError, match="more than a thing holds"):  # the size is checked before reading
        read(max_bytes=100, error=KeyError)
