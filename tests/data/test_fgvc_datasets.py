"""FGVC readers on tiny fixtures written in each official layout, the synthetic set, and the real CUB subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dcal.data import build_dataset
from dcal.data.fgvc import (
    COARSE_CLASSES,
    COARSE_SHAPES,
    SyntheticFGVC,
    build_fgvc_dataset,
    object_mask,
    render_synthetic,
    sample_coarse_params,
    sample_synthetic_params,
)
from dcal.data.layout import DatasetFormatError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------------------------------------
# CUB-200-2011

# (image id, class id, is_train); class ids 3, 7, 12 are not contiguous, as in a CUB subset
CUB_IMAGES = [(1, 3, 1), (2, 3, 0), (3, 7, 1), (4, 7, 1), (5, 12, 0), (6, 12, 1)]
CUB_CLASSES = {3: "003.Parakeet_Auklet", 7: "007.Parakeet_Auklet", 12: "012.Yellow_headed_Blackbird"}


def _write_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    base.mkdir(parents=True)
    (base / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in CUB_CLASSES.items()))
    images, labels, split = [], [], []
    for i, c, t in CUB_IMAGES:
        rel = f"{CUB_CLASSES[c]}/img_{i:04d}.jpg"
        _image(base / "images" / rel, colour=(i * 20, 0, 0))
        images.append(f"{i} {rel}\n")
        labels.append(f"{i} {c}\n")
        split.append(f"{i} {t}\n")
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(labels))
    (base / "train_test_split.txt").write_text("".join(split))
    return base


def test_cub_reads_splits_labels_and_names(tmp_path: Path) -> None:
    base = _write_cub(tmp_path)
    train = build_fgvc_dataset("cub", str(tmp_path), "train")
    test = build_fgvc_dataset("cub", str(base), "test")  # the CUB_200_2011 folder itself works too
    assert len(train) == 4 and len(test) == 2
    assert train.classes == test.classes == [CUB_CLASSES[c] for c in (3, 7, 12)]
    assert train.num_classes == 3
    assert train.targets == [0, 1, 1, 2]  # ids 1, 3, 4, 6 -> class ids 3, 7, 7, 12
    assert test.targets == [0, 2]
    assert train.name == "cub" and train.split == "train"
    image, target = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == 0
    assert Path(train.paths[0]).name == "img_0001.jpg"
    assert "samples=4" in repr(train) and "classes=3" in repr(train)


def test_cub_transform_and_entry_point(tmp_path: Path) -> None:
    _write_cub(tmp_path)
    ds = build_dataset("cub", str(tmp_path), "train", transform=lambda im: im.size)
    assert ds[0] == ((12, 10), 0)


def test_cub_missing_index_file(tmp_path: Path) -> None:
    base = _write_cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(DatasetFormatError, match="train_test_split.txt"):
        build_fgvc_dataset("cub", str(tmp_path), "train")


def test_cub_bad_line_names_file_and_line(tmp_path: Path) -> None:
    base = _write_cub(tmp_path)
    lines = (base / "images.txt").read_text().splitlines()
    lines[1] = "two 001.x/y.jpg"
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"CUB images.txt line 2: expected '<id> <path>', got 'two"):
        build_fgvc_dataset("cub", str(tmp_path), "train")


def test_cub_missing_image_is_named(tmp_path: Path) -> None:
    base = _write_cub(tmp_path)
    gone = base / "images" / CUB_CLASSES[7] / "img_0003.jpg"
    gone.unlink()
    with pytest.raises(DatasetFormatError, match="img_0003.jpg") as info:
        build_fgvc_dataset("cub", str(tmp_path), "train")
    assert "images.txt" in str(info.value)


def test_cub_label_of_unlisted_class(tmp_path: Path) -> None:
    base = _write_cub(tmp_path)
    (base / "image_class_labels.txt").write_text("".join(f"{i} {99 if i == 2 else c}\n" for i, c, _ in CUB_IMAGES))
    with pytest.raises(DatasetFormatError, match=r"image_class_labels.txt.*\[99\].*classes.txt"):
        build_fgvc_dataset("cub", str(tmp_path), "test")


def test_cub_absent_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="CUB_200_2011"):
        build_fgvc_dataset("cub", str(tmp_path / "nowhere"), "train")


# ----------------------------------------------------------------------------------------------------------
# Stanford Cars (devkit layout)

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi S4 Sedan 2012"]


def _annotations(rows: list[tuple[str, int]], with_class: bool = True) -> np.ndarray:
    names = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros(len(rows), dtype=[(n, "O") for n in names])
    for k, (fname, cls) in enumerate(rows):
        arr[k]["bbox_x1"], arr[k]["bbox_y1"], arr[k]["bbox_x2"], arr[k]["bbox_y2"] = 1, 1, 8, 8
        if with_class:
            arr[k]["class"] = cls
        arr[k]["fname"] = fname
    return arr


def _write_cars(root: Path, test_annos_in_devkit: bool = False) -> Path:
    base = root / "stanford_cars"
    devkit = base / "devkit"
    devkit.mkdir(parents=True)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": np.array(CARS_CLASSES, dtype=object)})
    train_rows = [("00001.jpg", 1), ("00002.jpg", 3), ("00003.jpg", 3)]
    test_rows = [("00001.jpg", 2), ("00002.jpg", 1)]
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": _annotations(train_rows)})
    test_dir = devkit if test_annos_in_devkit else base
    scipy.io.savemat(test_dir / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test_rows)})
    for fname, _ in train_rows:
        _image(base / "cars_train" / fname)
    for fname, _ in test_rows:
        _image(base / "cars_test" / fname)
    return base


def test_cars_devkit(tmp_path: Path) -> None:
    base = _write_cars(tmp_path)
    train = build_fgvc_dataset("cars", str(tmp_path), "train")
    test = build_fgvc_dataset("cars", str(base), "test")
    assert train.classes == CARS_CLASSES and train.num_classes == 3
    assert train.targets == [0, 2, 2] and test.targets == [1, 0]
    assert Path(train.paths[1]) == base / "cars_train" / "00002.jpg"
    assert Path(test.paths[0]) == base / "cars_test" / "00001.jpg"
    assert train[2][1] == 2 and train[2][0].mode == "RGB"


def test_cars_test_annotations_inside_devkit(tmp_path: Path) -> None:
    _write_cars(tmp_path, test_annos_in_devkit=True)
    assert len(build_fgvc_dataset("cars", str(tmp_path), "test")) == 2


def test_cars_missing_meta(tmp_path: Path) -> None:
    base = _write_cars(tmp_path)
    (base / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DatasetFormatError, match="cars_meta.mat"):
        build_fgvc_dataset("cars", str(tmp_path), "train")


def test_cars_unlabelled_test_annotations(tmp_path: Path) -> None:
    base = _write_cars(tmp_path)
    rows = [("00001.jpg", 0), ("00002.jpg", 0)]
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _annotations(rows, False)})
    with pytest.raises(DatasetFormatError, match=r"cars_test_annos_withlabels.mat.*'class'"):
        build_fgvc_dataset("cars", str(tmp_path), "test")


def test_cars_missing_image(tmp_path: Path) -> None:
    base = _write_cars(tmp_path)
    (base / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"cars_train_annos.mat.*00003.jpg"):
        build_fgvc_dataset("cars", str(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------------
# FGVC-Aircraft

AIR_VARIANTS = ["707-320", "A300B4", "F-16A/B"]
AIR_FAMILIES = ["Boeing 707", "A300", "F-16"]
AIR_TRAINVAL = [("0034309", 0), ("0034958", 2), ("0037511", 1), ("0037512", 2)]
AIR_TEST = [("1514522", 1), ("1514523", 0)]


def _write_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(AIR_VARIANTS) + "\n")
    (data / "families.txt").write_text("\n".join(AIR_FAMILIES) + "\n")
    for split, rows in (("trainval", AIR_TRAINVAL), ("test", AIR_TEST)):
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {AIR_VARIANTS[c]}\n" for i, c in rows))
        (data / f"images_family_{split}.txt").write_text("".join(f"{i} {AIR_FAMILIES[c]}\n" for i, c in rows))
        for image_id, _ in rows:
            _image(data / "images" / f"{image_id}.jpg")
    return data


def test_aircraft_variant_and_family(tmp_path: Path) -> None:
    data = _write_aircraft(tmp_path)
    train = build_fgvc_dataset("aircraft", str(tmp_path), "train")
    test = build_fgvc_dataset("aircraft", str(data), "test")
    assert train.classes == AIR_VARIANTS and len(train) == 4 and len(test) == 2
    assert train.targets == [c for _, c in AIR_TRAINVAL] and test.targets == [c for _, c in AIR_TEST]
    assert Path(train.paths[0]).name == "0034309.jpg"
    fam = build_dataset("aircraft", str(tmp_path / "fgvc-aircraft-2013b"), "train", annotation_level="family")
    assert fam.classes == AIR_FAMILIES and fam.targets == [c for _, c in AIR_TRAINVAL]


def test_aircraft_unknown_class_and_bad_level(tmp_path: Path) -> None:
    data = _write_aircraft(tmp_path)
    (data / "images_variant_test.txt").write_text("1514522 A300B4\n1514523 747-400\n")
    with pytest.raises(DatasetFormatError, match=r"images_variant_test.txt line 2: .*'747-400'.*variants.txt"):
        build_fgvc_dataset("aircraft", str(tmp_path), "test")
    with pytest.raises(ValueError, match="annotation_level"):
        build_fgvc_dataset("aircraft", str(tmp_path), "train", annotation_level="model")


def test_aircraft_missing_index_and_image(tmp_path: Path) -> None:
    data = _write_aircraft(tmp_path)
    (data / "images" / "1514523.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="1514523.jpg"):
        build_fgvc_dataset("aircraft", str(tmp_path), "test")
    (data / "images_variant_trainval.txt").unlink()
    with pytest.raises(DatasetFormatError, match="images_variant_trainval.txt"):
        build_fgvc_dataset("aircraft", str(tmp_path), "train")


# ----------------------------------------------------------------------------------------------------------
# image folder


def test_folder_layout(tmp_path: Path) -> None:
    for split, cls, n in (("train", "b_wren", 2), ("train", "a_gull", 3), ("test", "b_wren", 1)):
        for k in range(n):
            _image(tmp_path / split / cls / f"{k}.png")
    (tmp_path / "train" / "a_gull" / "notes.txt").write_text("not an image")
    train = build_fgvc_dataset("folder", str(tmp_path), "train")
    test = build_fgvc_dataset("folder", str(tmp_path), "test")
    assert train.classes == test.classes == ["a_gull", "b_wren"]
    assert train.targets == [0, 0, 0, 1, 1] and test.targets == [1]


def test_folder_unknown_test_class(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "gull" / "0.png")
    _image(tmp_path / "test" / "tern" / "0.png")
    with pytest.raises(DatasetFormatError, match="tern"):
        build_fgvc_dataset("folder", str(tmp_path), "test")
    with pytest.raises(DatasetFormatError, match="train"):
        build_fgvc_dataset("folder", str(tmp_path / "test"), "train")


def test_unknown_split_and_kwargs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        build_fgvc_dataset("cub", str(tmp_path), "val")
    with pytest.raises(TypeError, match="annotation_level"):
        build_fgvc_dataset("cub", str(tmp_path), "train", annotation_level="variant")


# ----------------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_and_balanced() -> None:
    a = build_dataset("synthetic", None, "train", num_classes=4, train_per_class=5, image_size=32, seed=3)
    b = SyntheticFGVC("train", num_classes=4, train_per_class=5, image_size=32, seed=3)
    c = SyntheticFGVC("train", num_classes=4, train_per_class=5, image_size=32, seed=4)
    test = SyntheticFGVC("test", num_classes=4, test_per_class=2, image_size=32, seed=3)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert len(a) == 20 and len(test) == 8 and a.num_classes == 4 and len(a.classes) == 4
    assert np.bincount(a.targets).tolist() == [5] * 4
    image, target = a[1]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB" and target == 1
    assert not any((test.images[i] == a.images).all(axis=(1, 2, 3)).any() for i in range(len(test)))


def test_synthetic_classes_differ_only_in_the_mark() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        params = sample_synthetic_params(rng, 64)
        y0, x0, m = params["mark_box"]
        images = [render_synthetic(params, k).astype(int) for k in range(10)]
        outside = np.ones((64, 64), bool)
        outside[y0 : y0 + m, x0 : x0 + m] = False
        for k in range(1, 10):
            diff = np.abs(images[k] - images[0]).sum(-1)
            assert diff[outside].max() == 0  # the class changes nothing outside the mark
            assert diff[~outside].max() > 0  # and every pair of patterns differs inside it
        assert m * m / 64**2 < 0.05  # the mark is a small detail


def test_synthetic_class_means_nearly_equal() -> None:
    ds = SyntheticFGVC("train", num_classes=6, train_per_class=200, image_size=32, seed=0)
    held_out = SyntheticFGVC("test", num_classes=6, test_per_class=100, image_size=32, seed=0)
    x = ds.images.astype(np.float64)
    y = np.asarray(ds.targets)
    colour = x.mean(axis=(1, 2))  # per-image mean RGB: the global colour shortcut
    class_colour = np.stack([colour[y == k].mean(0) for k in range(6)])
    # class means of the global colour differ only by sampling noise (within 4 standard errors)
    standard_error = colour.std(0) / np.sqrt(200)
    assert (np.abs(class_colour - colour.mean(0)) < 4 * standard_error).all()
    # per-class mean images are nearly equal: far below the per-pixel spread across images
    class_mean = np.stack([x[y == k].mean(0) for k in range(6)])
    assert (class_mean - x.mean(0)).std() < 0.3 * x.std(0).mean()
    # a nearest-class-mean classifier on the global colour is at chance on held-out images
    test_colour = held_out.images.astype(np.float64).mean(axis=(1, 2))
    pred = np.argmin(((test_colour[:, None, :] - class_colour[None]) ** 2).sum(-1), axis=1)
    assert (pred == np.asarray(held_out.targets)).mean() < 0.27  # chance = 1/6


def test_synthetic_mark_boxes_are_where_the_class_pattern_is() -> None:
    ds = SyntheticFGVC("test", num_classes=3, test_per_class=2, image_size=32, seed=1)
    assert ds.task == "mark" and len(ds.mark_boxes) == len(ds)
    y0, x0, m = ds.mark_boxes[0]
    again = render_synthetic(sample_synthetic_params(np.random.default_rng([1, 1]), 32), ds.targets[0])
    assert np.array_equal(ds.images[0], again)  # the boxes are the images' own parameters
    assert 0 <= y0 <= 32 - m and 0 <= x0 <= 32 - m


def test_coarse_task_has_no_mark_and_distinct_classes() -> None:
    ds = build_dataset("synthetic", None, "train", num_classes=6, train_per_class=3, image_size=48, task="coarse")
    assert ds.mark_boxes is None and ds.classes == list(COARSE_CLASSES) and ds.targets[:6] == list(range(6))
    assert not np.array_equal(ds.images, SyntheticFGVC("train", train_per_class=3, image_size=48).images)
    rng = np.random.default_rng(0)
    for label in range(6):
        params = sample_coarse_params(rng, 48, label)
        assert params["mark_box"] is None
        # no mark: the mark colours are drawn nowhere (changing them changes no pixel)
        other = {**params, "mark_dark": params["mark_dark"] + 60, "mark_light": params["mark_light"] - 60}
        assert np.array_equal(render_synthetic(params, label), render_synthetic(other, label))
    # the classes are learnable in principle: for one pose the three shapes cover clearly different pixels ...
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    u, v = xx - 24.0, yy - 24.0
    masks = [object_mask(shape, u, v, 15.0, 15.0) for shape in COARSE_SHAPES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] ^ masks[j]).sum() > 0.15 * (masks[i] | masks[j]).sum()  # circle vs square: 18%
    # ... and the stripes class lays a strong grating over the background only (same scene otherwise)
    smooth = sample_coarse_params(np.random.default_rng(5), 48, 0)
    striped = sample_coarse_params(np.random.default_rng(5), 48, 1)
    diff = render_synthetic(striped, 1).astype(float) - render_synthetic(smooth, 0).astype(float)
    changed = np.abs(diff).sum(-1) > 0
    assert 0.3 < changed.mean() < 0.95 and diff[changed].std() > 15  # object and distractors untouched
    with pytest.raises(ValueError, match="task"):
        SyntheticFGVC("train", task="parts")
    # the config key: data.synthetic_task, checked against its choices
    from dcal.config import ConfigError, dataset_kwargs, load_config

    assert dataset_kwargs(load_config(None, ["data.dataset=synthetic"]))["task"] == "mark"
    coarse = load_config(None, ["data.dataset=synthetic", "data.synthetic_task=coarse"])
    assert dataset_kwargs(coarse)["task"] == "coarse"
    with pytest.raises(ConfigError, match="data.synthetic_task"):
        load_config(None, ["data.dataset=synthetic", "data.synthetic_task=parts"])
    with pytest.raises(ValueError, match="2..6"):
        SyntheticFGVC("train", num_classes=7, task="coarse")


# ----------------------------------------------------------------------------------------------------------
# the real CUB subset


@pytest.mark.skipif(
    not (SHARED / "cub100" / "CUB_200_2011").is_dir(), reason="../shared/data is absent (it is present in CI)"
)
def test_real_cub100() -> None:
    root = SHARED / "cub100"
    train = build_dataset("cub", str(root), "train")
    test = build_dataset("cub", str(root / "CUB_200_2011"), "test")
    assert (len(train), len(test)) == (2903, 2999)
    assert train.num_classes == test.num_classes == 100
    assert set(train.targets) == set(test.targets) == set(range(100))
    assert train.classes[0] == "001.Black_footed_Albatross"
    image, target = test[len(test) - 1]
    assert image.mode == "RGB" and image.size == (227, 227) and target == 99
