"""Re-id dataset readers: layouts written in tmp_path, plus the real mini sets in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dcal.data import build_dataset
from dcal.data.layout import DatasetNotFoundError
from dcal.data.reid import (
    EmptySplitError,
    NoCommonIdentityError,
    ReIDDataset,
    ReIDFileNameError,
    build_reid_dataset,
    check_query_gallery,
    describe_splits,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent (it is present in CI)")


def _jpg(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), colour).save(path)


def _market(root: Path, prefix: str = "s1_000101_01") -> Path:
    """A tiny Market-1501 tree; returns the folder holding the split folders."""
    train = ["0002_c1", "0002_c2", "0007_c3", "0007_c3", "0010_c6", "-1_c1"]
    query = ["0002_c1", "0007_c4", "0011_c2"]
    gallery = ["0002_c1", "0002_c5", "0007_c4", "0007_c1", "0000_c3", "0000_c2", "-1_c1", "-1_c2", "0011_c2"]
    for sub, names in (("bounding_box_train", train), ("query", query), ("bounding_box_test", gallery)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(names):
            _jpg(root / sub / f"{n}{prefix[:2]}_{i:06d}_01.jpg")
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    return root


def test_market_reads_pids_camids_and_relabels(tmp_path: Path) -> None:
    base = _market(tmp_path / "Market-1501-v15.09.15")
    train = build_dataset("market1501", str(tmp_path), "train")  # parent with the conventional name
    assert train.root == str(base)
    assert train.original_pids == [2, 2, 7, 7, 10]  # junk -1 dropped
    assert train.pids == [0, 0, 1, 1, 2] and train.targets is train.pids
    assert train.camids == [0, 1, 2, 2, 5]
    assert (train.num_classes, train.num_cameras, len(train)) == (3, 4, 5)
    image, pid, camid = train[4]
    assert image.mode == "RGB" and image.size == (8, 16) and (pid, camid) == (2, 5)

    gallery = build_reid_dataset("market1501", base, "gallery")  # the folder itself works too
    assert -1 not in gallery.pids and gallery.pids.count(0) == 2  # distractors kept
    assert gallery.pids == gallery.original_pids  # no relabelling outside train
    assert gallery.num_classes == 4 and len(gallery) == 7

    query = build_reid_dataset("market1501", base, "query", transform=lambda im: torch.zeros(3, 2, 2))
    x, pid, camid = query[1]
    assert x.shape == (3, 2, 2) and (pid, camid) == (7, 3)
    assert "train" in train.describe() and "# cameras" in describe_splits([train, query, gallery])
    assert "ids=3" in repr(train) and "images=5" in repr(train)


def test_check_query_gallery_counts_and_errors(tmp_path: Path) -> None:
    base = _market(tmp_path / "m")
    q = build_reid_dataset("market1501", base, "query")
    g = build_reid_dataset("market1501", base, "gallery")
    # query 0002/c1 has gallery 0002 in c5 (valid), 0007/c4 has 0007/c1 (valid), 0011/c2 only same camera.
    assert check_query_gallery(q, g) == {
        "num_query": 3, "num_gallery": 7, "num_query_ids": 3, "num_shared_ids": 3,
        "num_valid_queries": 2, "num_skipped_queries": 1,
    }
    other = ReIDDataset([("a.jpg", 99, 0), ("b.jpg", 98, 1)], name="x", split="gallery", root="r")
    with pytest.raises(NoCommonIdentityError, match="none of the 3 identities"):
        check_query_gallery(q, other)
    same_cam = ReIDDataset([("a.jpg", 2, 0)], name="x", split="gallery", root="r")
    q_one = ReIDDataset([("q.jpg", 2, 0)], name="x", split="query", root="r")
    with pytest.raises(NoCommonIdentityError, match="own camera"):
        check_query_gallery(q_one, same_cam)


def test_duke_layout_and_camera_range(tmp_path: Path) -> None:
    base = tmp_path / "DukeMTMC-reID"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    _jpg(base / "bounding_box_train" / "0001_c2_f0046182.jpg")
    _jpg(base / "bounding_box_train" / "0005_c8_f0000001.jpg")
    _jpg(base / "query" / "0005_c1_f0000002.jpg")
    _jpg(base / "bounding_box_test" / "0005_c7_f0000003.jpg")
    train = build_dataset("dukemtmc", str(tmp_path), "train")
    assert train.original_pids == [1, 5] and train.pids == [0, 1] and train.camids == [1, 7]
    assert build_dataset("dukemtmc", str(base), "gallery").camids == [6]
    _jpg(base / "query" / "0006_c9_f0000002.jpg")  # Duke has 8 cameras
    with pytest.raises(ReIDFileNameError, match="0006_c9_f0000002.jpg"):
        build_dataset("dukemtmc", str(base), "query")


def test_market_errors_name_the_file_or_folder(tmp_path: Path) -> None:
    base = _market(tmp_path / "market1501")
    _jpg(base / "query" / "person_one.jpg")
    with pytest.raises(ReIDFileNameError, match=r"person_one\.jpg.*\(\[-\\d\]\+\)_c\(\\d\)"):
        build_reid_dataset("market1501", tmp_path, "query")
    assert issubclass(ReIDFileNameError, ValueError)

    (base / "bounding_box_test").rename(base / "gallery")
    with pytest.raises(DatasetNotFoundError, match="bounding_box_test") as err:
        build_reid_dataset("market1501", base, "train")
    assert str(base / "bounding_box_test") in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_reid_dataset("market1501", tmp_path / "nowhere", "train")


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / sub).mkdir()
    _jpg(tmp_path / "query" / "-1_c1s1_000001_00.jpg")  # only junk
    with pytest.raises(EmptySplitError, match="query"):
        build_reid_dataset("market1501", tmp_path, "query")
    with pytest.raises(EmptySplitError, match="train"):
        build_reid_dataset("market1501", tmp_path, "train")


def _msmt(root: Path, v2: bool = False) -> Path:
    train_dir, test_dir = ("mask_train_v2", "mask_test_v2") if v2 else ("train", "test")
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0000/0000_001_05_0303noon_0001_1.jpg", 0),
                           ("0003/0003_000_15_0303afternoon_0002_0.jpg", 3)],
        "list_val.txt": [("0001/0001_000_02_0303morning_0003_0.jpg", 1)],
        "list_query.txt": [("0000/0000_000_03_0303morning_0008_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_003_07_0303noon_0009_0.jpg", 0), ("0002/0002_c4_0001.jpg", 2)],
    }
    for name, entries in lists.items():
        folder = root / (train_dir if name in ("list_train.txt", "list_val.txt") else test_dir)
        for rel, _ in entries:
            _jpg(folder / rel)
        (root / name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries) + "\n")
    return root


@pytest.mark.parametrize("v2", [False, True])
def test_msmt17_v1_and_v2(tmp_path: Path, v2: bool) -> None:
    base = _msmt(tmp_path / ("MSMT17_V2" if v2 else "MSMT17_V1"), v2=v2)
    train = build_dataset("msmt17", str(tmp_path), "train")
    assert train.original_pids == [0, 0, 3, 1]  # val joins train by default
    assert train.pids == [0, 0, 2, 1] and train.num_classes == 3
    assert train.camids == [0, 4, 14, 1]
    assert Path(train.paths[0]).is_file()
    train_only = build_dataset("msmt17", str(base), "train", val_in_train=False)
    assert train_only.original_pids == [0, 0, 3]
    gallery = build_dataset("msmt17", str(base), "gallery")
    assert gallery.pids == [0, 2] and gallery.camids == [6, 3]  # 3rd field, and the _cXX form
    query = build_dataset("msmt17", str(base), "query")
    assert query.camids == [2]
    assert check_query_gallery(query, gallery)["num_valid_queries"] == 1


def test_msmt17_errors(tmp_path: Path) -> None:
    base = _msmt(tmp_path / "MSMT17_V1")
    (base / "list_query.txt").write_text("0000/0000_000_03_0303morning_0008_0.jpg\n")
    with pytest.raises(ReIDFileNameError, match=r"list_query\.txt:1"):
        build_dataset("msmt17", str(base), "query")
    (base / "list_query.txt").write_text("0000/badname.jpg 0\n")
    with pytest.raises(ReIDFileNameError, match="badname"):
        build_dataset("msmt17", str(base), "query")
    (base / "list_val.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="list_val.txt"):
        build_dataset("msmt17", str(base), "train")
    with pytest.raises(TypeError, match="unexpected"):
        build_dataset("msmt17", str(base), "train", bogus=1)


def test_veri(tmp_path: Path) -> None:
    base = tmp_path / "VeRi"
    _jpg(base / "image_train" / "0001_c001_00016450_0.jpg")
    _jpg(base / "image_train" / "0005_c020_00016450_0.jpg")
    _jpg(base / "image_query" / "0002_c002_00030600_0.jpg")
    _jpg(base / "image_test" / "0002_c003_00030605_1.jpg")
    train = build_dataset("veri", str(tmp_path), "train")
    assert train.pids == [0, 1] and train.original_pids == [1, 5] and train.camids == [0, 19]
    gallery = build_dataset("veri", str(base), "gallery")
    assert gallery.pids == [2] and gallery.camids == [2]
    _jpg(base / "image_query" / "0002_c2_00030600_0.jpg")  # 1-digit camera: not VeRi's pattern
    with pytest.raises(ReIDFileNameError, match="0002_c2_00030600_0.jpg"):
        build_dataset("veri", str(base), "query")
    with pytest.raises(DatasetNotFoundError, match="image_train"):
        build_dataset("veri", str(tmp_path / "VeRi" / "image_test"), "train")


def test_reid_folder(tmp_path: Path) -> None:
    _jpg(tmp_path / "train" / "0100" / "a_c1_0001.jpg")
    _jpg(tmp_path / "train" / "0100" / "c2-0002.png")
    _jpg(tmp_path / "train" / "0042" / "x.c12.jpg")
    _jpg(tmp_path / "train" / "-1" / "junk_c1.jpg")
    _jpg(tmp_path / "query" / "0042" / "0042_c1s1_000001_00.jpg")
    _jpg(tmp_path / "gallery" / "0042" / "0042_c3s1_000001_00.jpg")
    _jpg(tmp_path / "gallery" / "0000" / "0000_c3s1_000002_00.jpg")
    train = build_dataset("reid_folder", str(tmp_path), "train")
    assert train.original_pids == [42, 100, 100] and train.pids == [0, 1, 1]
    assert train.camids == [11, 0, 1]
    assert build_dataset("reid_folder", str(tmp_path), "train", camera_base=0).camids == [12, 1, 2]
    q = build_dataset("reid_folder", str(tmp_path), "query")
    g = build_dataset("reid_folder", str(tmp_path), "gallery")
    assert q.pids == [42] and q.camids == [0] and g.pids == [0, 42]
    assert check_query_gallery(q, g)["num_valid_queries"] == 1

    _jpg(tmp_path / "query" / "0042" / "disc3.jpg")  # "c3" inside a word is not a camera token
    with pytest.raises(ReIDFileNameError, match=r"disc3\.jpg.*c<digits>"):
        build_dataset("reid_folder", str(tmp_path), "query")
    q2 = build_dataset("reid_folder", str(tmp_path), "query", default_camid=7)
    assert q2.camids == [0, 7]
    _jpg(tmp_path / "gallery" / "alice" / "alice_c1.jpg")
    with pytest.raises(ReIDFileNameError, match="alice"):
        build_dataset("reid_folder", str(tmp_path), "gallery")
    _jpg(tmp_path / "train" / "loose_c1.jpg")
    with pytest.raises(ReIDFileNameError, match="loose_c1.jpg"):
        build_dataset("reid_folder", str(tmp_path), "train")
    with pytest.raises(DatasetNotFoundError, match=r"gallery.*\{train,query,gallery\}"):
        build_dataset("reid_folder", str(tmp_path / "train"), "gallery")


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown re-id dataset"):
        build_reid_dataset("cuhk03", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown re-id split"):
        build_reid_dataset("market1501", tmp_path, "test")


@needs_shared
@pytest.mark.parametrize(
    "folder, counts, valid",
    [
        # (ids, images, cameras) for train, query, gallery, as in ../shared/data/README.md
        ("market1501_mini", [(16, 32, 6), (16, 32, 6), (16, 32, 6)], 30),
        ("mars_reid_mini", [(16, 256, 6), (16, 64, 6), (16, 192, 5)], 46),
    ],
)
def test_real_mini_sets(folder: str, counts: list[tuple[int, int, int]], valid: int) -> None:
    splits = [build_dataset("market1501", str(SHARED / folder), s) for s in ("train", "query", "gallery")]
    assert [(d.num_classes, len(d), d.num_cameras) for d in splits] == counts
    train, query, gallery = splits
    assert sorted(set(train.pids)) == list(range(16))
    assert not set(train.original_pids) & set(gallery.pids)  # train and test identities are disjoint
    assert set(query.pids) == set(gallery.pids)
    assert all(0 <= c <= 5 for d in splits for c in d.camids)
    image, pid, camid = query[0]
    assert image.mode == "RGB" and pid == query.pids[0] and camid == query.camids[0]
    assert check_query_gallery(query, gallery)["num_valid_queries"] == valid
