"""Reading image files (dcal.data.images): one list of extensions, upright and correctly scaled pixels for every
reader, folders listed without opening FIFOs or following link loops, names that are not UTF-8 written safely."""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcal.cli import main
from dcal.data import build_dataset
from dcal.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_image_files,
    open_rgb,
    printable,
    safe_file_name,
    to_rgb,
)
from dcal.data.robust import BadImageError, check_bad_fraction
from dcal.inference import ImageInputs, list_images
from tests.helpers import write_images

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_rotated_jpeg(path: Path) -> None:
    """Stored 40 wide x 20 high, left half red, with EXIF orientation 6: upright it is 20 x 40, red on top."""
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20], a[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, exif=exif, quality=95)


def assert_upright(image: Image.Image) -> None:
    a = np.asarray(image).astype(int)
    assert image.mode == "RGB" and image.size == (20, 40)  # (W, H): turned by the EXIF tag
    assert np.abs(a[:15].mean((0, 1)) - RED).max() < 20 and np.abs(a[25:].mean((0, 1)) - BLUE).max() < 20


def run_with_timeout(fn, seconds: float = 60.0, release: Path | None = None):
    """``fn()`` in a thread; fails (after unblocking a reader stuck on the FIFO ``release``) if it hangs."""
    result: dict[str, object] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if release is not None:  # a blocked open() of the FIFO for reading returns once a writer opens it
            fd = os.open(release, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"hung for {seconds} s (a FIFO was opened)")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


def test_one_extension_list_for_every_reader():
    from dcal.data import fgvc, reid

    assert ".tif" in IMAGE_EXTENSIONS and reid.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert not hasattr(fgvc, "IMG_EXTENSIONS")


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    # folder layout (FGVC)
    for split in ("train", "test"):
        write_rotated_jpeg(tmp_path / "fgvc" / split / "alpha" / "r.jpg")
    fgvc = build_dataset("folder", str(tmp_path / "fgvc"), "train")
    assert_upright(fgvc.load_image(0))
    assert_upright(fgvc[0][0])
    # reid_folder layout (Re-ID)
    write_rotated_jpeg(tmp_path / "reid" / "train" / "0001" / "0001_c1_0001.jpg")
    assert_upright(build_dataset("reid_folder", str(tmp_path / "reid"), "train")[0][0])
    # predict / embed / search / visualize
    image, _, error = ImageInputs([tmp_path / "fgvc" / "test" / "alpha" / "r.jpg"], lambda im: im)[0]
    assert error == "" and image is not None
    assert_upright(image)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    Image.fromarray(values).save(path)  # mode I;16
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        assert np.asarray(im.convert("RGB"))[0, 1, 0] == 255  # what a plain convert gives: white
    a = np.asarray(open_rgb(path))
    assert a.shape == (2, 2, 3) and (a[..., 0] == a[..., 2]).all()
    assert a[0, 0, 0] == 0 and a[0, 1, 0] in (127, 128) and a[1, 0, 0] == 255 and a[1, 1, 0] in (63, 64)


def test_other_modes_become_8_bit_rgb():
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (50, 255))
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]  # transparent: white
    p = Image.new("P", (1, 1), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p)).tolist() == [[[255, 255, 255]]]
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == RED
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    f = Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32))  # mode F in 0..1
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128]
    i32 = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # mode I holding 8-bit values
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 200]


def test_truncated_file_fails_when_read(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 7).save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(OSError):
        open_rgb(path)


def test_tif_is_found_by_predict_and_by_the_folder_dataset(tmp_path):
    for split in ("train", "test"):
        folder = tmp_path / split / "alpha"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.tif")
    assert [Path(p).name for p in build_dataset("folder", str(tmp_path), "test").paths] == ["a.tif"]
    assert [p.name for p in list_images([tmp_path / "test"])] == ["a.tif"]


def _said(caplog) -> str:
    """The warnings dcal logged (each one also printed on stderr by the commands' handler)."""
    return " ".join(r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and r.name.startswith("dcal."))


def test_a_fifo_in_a_folder_is_skipped_by_name(tmp_path, caplog):
    for split in ("train", "test"):
        write_images(tmp_path / split / "alpha", ["a.png"], np.random.default_rng(0))
    fifo = tmp_path / "train" / "alpha" / "pipe.png"
    os.mkfifo(fifo)
    files = run_with_timeout(lambda: list_image_files(tmp_path), release=fifo)
    assert "pipe.png: a FIFO, not a regular file" in _said(caplog)
    assert [p.name for p in files] == ["a.png", "a.png"]
    caplog.clear()
    data = run_with_timeout(lambda: build_dataset("folder", str(tmp_path), "train"), release=fifo)
    assert "a FIFO" in _said(caplog)
    assert [Path(p).name for p in data.paths] == ["a.png"]
    with pytest.raises(ImageReadError, match="a FIFO, not a regular file"):
        run_with_timeout(lambda: open_rgb(fifo), release=fifo)


def test_links_into_the_tree_are_not_followed(tmp_path, caplog):
    for split in ("train", "test"):
        write_images(tmp_path / split / "alpha", ["a.png"], np.random.default_rng(0))
        write_images(tmp_path / split / "beta", ["b.png"], np.random.default_rng(1))
    os.symlink(".", tmp_path / "train" / "again")  # a class folder linked to its parent
    os.symlink("..", tmp_path / "train" / "alpha" / "up")  # a loop below a class folder
    os.symlink("../beta", tmp_path / "train" / "alpha" / "other")  # another class's images
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    write_images(outside, ["o.png"], np.random.default_rng(2))
    os.symlink(outside, tmp_path / "train" / "beta" / "more")  # outside the tree: followed
    data = run_with_timeout(lambda: build_dataset("folder", str(tmp_path), "train"))
    assert data.classes == ["alpha", "beta"]
    assert sorted((Path(p).name, data.classes[t]) for p, t in zip(data.paths, data.targets, strict=True)) == [
        ("a.png", "alpha"), ("b.png", "beta"), ("o.png", "beta")]
    said = _said(caplog)
    assert "symbolic link" in said and all(name in said for name in ("again", "up", "other"))


def test_names_that_are_not_utf8():
    name = os.fsdecode(b"caf\xe9_\xff.png")
    assert printable(name) == "caf\\xe9_\\xff.png" and printable(name).encode("utf-8")
    assert printable("été.png") == "été.png"
    long = safe_file_name("00001_" + "q" * 250, ".png")
    assert len(long.encode("utf-8")) <= 255 and long.endswith(".png") and long.startswith("00001_qqq")
    assert long != safe_file_name("00001_" + "q" * 249 + "r", ".png")  # the hash keeps cut names apart
    assert safe_file_name("a/b", ".png") == "a_b.png"


@pytest.fixture
def odd_inputs(fgvc_run, tmp_path):
    """A folder with a good image under a name that is not UTF-8, and a FIFO named like an image."""
    _, data = fgvc_run
    folder = os.path.join(os.fsencode(tmp_path), b"odd")
    os.mkdir(folder)
    with open(os.path.join(folder, b"\xff.png"), "wb") as f:
        f.write((data / "test" / "alpha" / "alpha0.png").read_bytes())
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    return Path(os.fsdecode(folder)), fifo


def test_predict_non_utf8_names_and_a_fifo(fgvc_run, odd_inputs, tmp_path, capsys):
    run, _ = fgvc_run
    folder, fifo = odd_inputs
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        code = run_with_timeout(lambda out=out: main(["predict", "--run", str(run), str(folder), str(fifo),
                                                      "--output", str(out)]), release=fifo)
        assert code == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert rows[0]["path"].endswith("odd/\\xff.png") and rows[0]["error"] == "" and rows[0]["class_1"]
    assert rows[1]["path"] == str(fifo) and "a FIFO, not a regular file" in rows[1]["error"]
    records = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert records[0]["source"].endswith("\\xff.png") and records[0]["classes"]
    assert "\\xff.png" in capsys.readouterr().out


def test_predict_fails_when_nothing_can_be_read(fgvc_run, tmp_path, capsys):
    run, _ = fgvc_run
    bad = [tmp_path / "a.png", tmp_path / "b.jpg"]
    bad[0].write_text("not an image")
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run), *map(str, bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dcal predict: error: no input could be read: 2 file(s) failed"]
    assert len(list(csv.DictReader(out.open()))) == 2  # the reasons are still written


def test_visualize_titles_from_non_utf8_names(fgvc_run, odd_inputs, tmp_path):
    run, data = fgvc_run
    folder, _ = odd_inputs
    out = tmp_path / "pic.png"
    assert main(["visualize", "--run", str(run), "--output", str(out), "--images", str(folder),
                 str(data / "test" / "beta" / "beta0.png")]) == 0
    assert out.is_file()


def test_search_with_odd_and_long_query_names(reid_run, tmp_path):
    run, root = reid_run
    query = os.path.join(os.fsencode(tmp_path), b"query")
    os.mkdir(query)
    src = sorted((root / "query").iterdir())
    names = [b"0020_c1s1_000120_00" + b"x" * 230 + b".jpg", b"0021_c1s1_000121_00\xff.jpg"]
    for s, n in zip(src, names, strict=False):
        with open(os.path.join(query, n), "wb") as f:
            f.write(s.read_bytes())
    out = tmp_path / "search"
    assert main(["search", "--run", str(run), "--query", os.fsdecode(query), "--gallery",
                 str(root / "bounding_box_test"), "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "ranking.csv").open(encoding="utf-8")))
    assert any(r["query"].endswith("\\xff.jpg") for r in rows)
    assert json.loads((out / "metrics.json").read_text())["num_skipped_queries"] == 0  # both queries evaluated
    pics = sorted(p.name for p in (out / "visrank").iterdir())
    assert len(pics) == 2 and all(len(p.encode()) <= 255 for p in pics)


def test_broken_dataset_needs_evidence():
    check_bad_fraction(2, 2, ["a", "b"], "training")  # one batch of 2 bad files: no verdict yet
    check_bad_fraction(25, 50, ["a"], "training")  # half is not most
    with pytest.raises(BadImageError, match="looks broken"):
        check_bad_fraction(26, 50, ["a"], "training")
    with pytest.raises(BadImageError, match="looks broken"):  # end of epoch: all it read is the evidence
        check_bad_fraction(4, 4, ["a"], "training", min_seen=1)
