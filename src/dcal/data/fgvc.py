"""Fine-grained classification datasets: CUB-200-2011, Stanford Cars, FGVC-Aircraft, an image folder and a
procedurally generated demo set.

Every reader checks its on-disk layout when it is built (index files present and well formed, every listed
image present) and raises :class:`~dcal.data.layout.DatasetFormatError` naming the file and what it expected,
so that a broken dataset fails before any training starts.

All datasets return ``(image, target)`` with ``image`` a PIL RGB image passed through ``transform`` and
``target`` a 0-based int, and expose ``classes``, ``targets``, ``paths``, ``name``, ``split`` and
``num_classes``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dcal.data.images import IMAGE_EXTENSIONS, list_image_files, list_subfolders, open_rgb
from dcal.data.layout import DatasetFormatError, DatasetNotFoundError, find_dataset_root
from dcal.data.registry import SPLITS as TASK_SPLITS
from dcal.data.registry import build_dataset, dataset_names
from dcal.vocabulary import AIRCRAFT_LEVELS, SYNTHETIC_TASKS

SPLITS = TASK_SPLITS["fgvc"]
# the class list of each annotation level
AIRCRAFT_CLASS_FILES = dict(zip(AIRCRAFT_LEVELS, ("variants.txt", "families.txt", "manufacturers.txt"), strict=True))


class FGVCDataset(Dataset):
    """A list of image files with 0-based class targets.

    Args:
        name: dataset name (``cub``, ``cars``, ...).
        split: ``train`` or ``test``.
        paths: image file paths, one per sample.
        targets: 0-based class index per sample.
        classes: class names; ``targets`` index into it.
        transform: applied to the PIL RGB image.
        root: the folder the dataset was read from (for ``repr``).
        class_ids: the data set's own id of each class (what ``data.classes`` selects by); default 1..C.
    """

    def __init__(
        self,
        name: str,
        split: str,
        paths: Sequence[str],
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Callable | None = None,
        root: str | None = None,
        class_ids: Sequence[int] | None = None,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.name = name
        self.split = split
        self.paths = list(paths)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.class_ids = list(class_ids) if class_ids is not None else list(range(1, len(self.classes) + 1))
        self.transform = transform
        self.root = root

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        """The sample's image as upright 8-bit PIL RGB (:func:`dcal.data.images.open_rgb`), before ``transform``."""
        return open_rgb(self.paths[index])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self) -> str:
        used = len(set(self.targets))
        lines = [
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, samples={len(self)}, "
            f"classes={self.num_classes}, classes_present={used})",
        ]
        if self.root is not None:
            lines.append(f"  root: {self.root}")
        if self.transform is not None:
            lines.append(f"  transform: {self.transform!r}".replace("\n", "\n  "))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _read_lines(name: str, path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text index as ``(line_number, stripped_line)``."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{name}: missing index file {path}")
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _read_id_table(name: str, path: Path, expected: str, value_int: bool) -> dict[int, Any]:
    """Parse ``<int id> <value>`` lines; the value is the rest of the line (an int when ``value_int``)."""
    table: dict[int, Any] = {}
    for n, line in _read_lines(name, path):
        parts = line.split(maxsplit=1)
        ok = len(parts) == 2 and parts[0].isdigit() and (not value_int or parts[1].strip().isdigit())
        if not ok:
            raise DatasetFormatError(f"{name} {path.name} line {n}: expected {expected!r}, got {line!r} ({path})")
        key = int(parts[0])
        if key in table:
            raise DatasetFormatError(f"{name} {path.name} line {n}: duplicate id {key} ({path})")
        table[key] = int(parts[1]) if value_int else parts[1].strip()
    if not table:
        raise DatasetFormatError(f"{name}: index file {path} is empty; expected lines {expected!r}")
    return table


def _check_images_exist(name: str, paths: Sequence[str], index_file: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetFormatError(
            f"{name}: {len(missing)} image(s) listed in {index_file} are missing on disk: {shown}"
        )


# ----------------------------------------------------------------------------------------------------------
# CUB-200-2011


def read_cub(root: str, split: str, transform: Callable | None) -> FGVCDataset:
    """CUB-200-2011 in its official layout.

    Class ids in ``classes.txt`` need not be contiguous (subsets such as a 100-class CUB keep the original
    ids): targets are 0..C-1 over the ids listed in ``classes.txt`` in increasing id order, names kept.
    """
    base = find_dataset_root(root, ("CUB_200_2011",), ["images.txt"], "CUB")
    classes_txt = base / "classes.txt"
    images_txt = base / "images.txt"
    labels_txt = base / "image_class_labels.txt"
    split_txt = base / "train_test_split.txt"
    class_names = _read_id_table("CUB", classes_txt, "<class_id> <class_name>", value_int=False)
    images = _read_id_table("CUB", images_txt, "<id> <path>", value_int=False)
    labels = _read_id_table("CUB", labels_txt, "<id> <class_id>", value_int=True)
    is_train = _read_id_table("CUB", split_txt, "<id> <is_training_image>", value_int=True)

    for table, path in ((labels, labels_txt), (is_train, split_txt)):
        missing = sorted(set(images) - set(table))
        if missing:
            raise DatasetFormatError(
                f"CUB {path.name}: no entry for image id(s) {missing[:5]} listed in images.txt ({path})"
            )
    bad_flag = sorted(i for i, f in is_train.items() if f not in (0, 1))
    if bad_flag:
        raise DatasetFormatError(
            f"CUB {split_txt.name}: is_training_image must be 0 or 1, got {is_train[bad_flag[0]]} "
            f"for image id {bad_flag[0]} ({split_txt})"
        )
    unknown = sorted({c for c in labels.values() if c not in class_names})
    if unknown:
        raise DatasetFormatError(
            f"CUB {labels_txt.name}: class id(s) {unknown[:5]} are not listed in classes.txt ({labels_txt})"
        )

    class_ids = sorted(class_names)
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    want = 1 if split == "train" else 0
    ids = [i for i in sorted(images) if is_train[i] == want]
    paths = [str(base / "images" / images[i]) for i in ids]
    _check_images_exist("CUB", paths, images_txt)
    targets = [index_of[labels[i]] for i in ids]
    return FGVCDataset("cub", split, paths, targets, [class_names[c] for c in class_ids], transform, str(base),
                       class_ids=class_ids)


# ----------------------------------------------------------------------------------------------------------
# Stanford Cars


def _loadmat(name: str, path: Path, key: str) -> Any:
    import scipy.io

    if not path.is_file():
        raise DatasetNotFoundError(f"{name}: missing annotation file {path}")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for a corrupt file
        raise DatasetFormatError(f"{name}: cannot read MATLAB file {path}: {e}") from e
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{name} {path.name}: expected a variable {key!r}, found {found} ({path})")
    return mat[key]


def read_cars(root: str, split: str, transform: Callable | None) -> FGVCDataset:
    """Stanford Cars in the devkit layout ``torchvision.datasets.StanfordCars`` reads.

    Read here rather than through torchvision so that layout problems raise :class:`DatasetFormatError`
    naming the file. ``cars_test_annos_withlabels.mat`` is looked up next to ``cars_test/`` and, as some
    mirrors place it, inside ``devkit/``.
    """
    base = find_dataset_root(root, ("stanford_cars",), ["devkit"], "Cars")
    devkit = base / "devkit"
    raw_names = _loadmat("Cars", devkit / "cars_meta.mat", "class_names")
    classes = [str(c).strip() for c in np.atleast_1d(raw_names).tolist()]
    if split == "train":
        annos_path, images_dir = devkit / "cars_train_annos.mat", base / "cars_train"
    else:
        annos_path, images_dir = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        if not annos_path.is_file() and (devkit / annos_path.name).is_file():
            annos_path = devkit / annos_path.name
    annos = np.atleast_1d(_loadmat("Cars", annos_path, "annotations"))
    fields = annos.dtype.names or ()
    for field in ("fname", "class"):
        if field not in fields:
            raise DatasetFormatError(
                f"Cars {annos_path.name}: annotations lack the field {field!r} (fields: {list(fields)}); "
                f"the test split needs cars_test_annos_withlabels.mat ({annos_path})"
            )
    paths, targets = [], []
    for k, a in enumerate(annos):
        label = int(a["class"])
        if not 1 <= label <= len(classes):
            raise DatasetFormatError(
                f"Cars {annos_path.name} annotation {k}: class {label} outside 1..{len(classes)} "
                f"(cars_meta.mat lists {len(classes)} classes) ({annos_path})"
            )
        paths.append(str(images_dir / str(a["fname"])))
        targets.append(label - 1)  # the devkit's class ids are 1-based
    _check_images_exist("Cars", paths, annos_path)
    return FGVCDataset("cars", split, paths, targets, classes, transform, str(base))


# ----------------------------------------------------------------------------------------------------------
# FGVC-Aircraft


def read_aircraft(
    root: str, split: str, transform: Callable | None, annotation_level: str = "variant"
) -> FGVCDataset:
    """FGVC-Aircraft (``fgvc-aircraft-2013b/data``); train = the official ``trainval`` split.

    Classes are listed in the order of ``variants.txt`` / ``families.txt`` / ``manufacturers.txt`` (as
    torchvision does). Images keep the 20-pixel copyright banner at the bottom, as torchvision does.
    """
    if annotation_level not in AIRCRAFT_CLASS_FILES:
        raise ValueError(
            f"aircraft: unknown annotation_level {annotation_level!r}; expected one of {AIRCRAFT_LEVELS}"
        )
    base = find_dataset_root(root, ("fgvc-aircraft-2013b/data", "data"), ["images"], "Aircraft")
    classes_txt = base / AIRCRAFT_CLASS_FILES[annotation_level]
    classes = [line for _, line in _read_lines("Aircraft", classes_txt)]
    if not classes:
        raise DatasetFormatError(f"Aircraft: class list {classes_txt} is empty")
    index_of = {c: i for i, c in enumerate(classes)}
    split_name = "trainval" if split == "train" else "test"
    index_txt = base / f"images_{annotation_level}_{split_name}.txt"
    paths, targets = [], []
    for n, line in _read_lines("Aircraft", index_txt):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DatasetFormatError(
                f"Aircraft {index_txt.name} line {n}: expected '<image_id> <{annotation_level}>', "
                f"got {line!r} ({index_txt})"
            )
        image_id, cls = parts[0], parts[1].strip()
        if cls not in index_of:
            raise DatasetFormatError(
                f"Aircraft {index_txt.name} line {n}: {annotation_level} {cls!r} is not listed in "
                f"{classes_txt.name} ({index_txt})"
            )
        paths.append(str(base / "images" / f"{image_id}.jpg"))
        targets.append(index_of[cls])
    _check_images_exist("Aircraft", paths, index_txt)
    return FGVCDataset("aircraft", split, paths, targets, classes, transform, str(base))


# ----------------------------------------------------------------------------------------------------------
# image folder


def read_folder(root: str, split: str, transform: Callable | None) -> FGVCDataset:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; classes are the train sub-folders, sorted."""
    base = Path(root).expanduser()
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"folder: missing {train_dir}; expected root/train/<class>/<image files>")
    classes = list_subfolders(train_dir)
    if not classes:
        raise DatasetFormatError(f"folder: {train_dir} has no class sub-folders; expected train/<class>/...")
    split_dir = base / split
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"folder: missing {split_dir}; expected root/{split}/<class>/<image files>")
    present = classes if split == "train" else list_subfolders(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DatasetFormatError(
            f"folder: {split_dir} has class folder(s) {unknown[:5]} that {train_dir} does not have"
        )
    index_of = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for cls in present:
        # a link below a class folder into the split (another class, or a loop) is not followed
        files = [str(p) for p in list_image_files(split_dir / cls, tree=split_dir)]
        paths += files
        targets += [index_of[cls]] * len(files)
    if not paths:
        raise DatasetFormatError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
    return FGVCDataset("folder", split, paths, targets, classes, transform, str(base))


# ----------------------------------------------------------------------------------------------------------
# synthetic fine-grained demo set (task ``mark``) and its generic pre-training set (task ``coarse``)

MARK_FRACTION = 0.22  # side of the class mark relative to the image side
N_DISTRACTORS = 2  # solid squares of the mark's size, placed anywhere
COARSE_SHAPES = ("ellipse", "rectangle", "triangle")
COARSE_TEXTURES = ("smooth", "stripes")
# coarse class k: shape k // 2, background texture k % 2
COARSE_CLASSES = tuple(f"{shape}_{texture}" for shape in COARSE_SHAPES for texture in COARSE_TEXTURES)

SYNTHETIC_PATTERNS = (
    "horizontal_stripes",
    "vertical_stripes",
    "checker",
    "top_bottom",
    "left_right",
    "square_rings",
    "disc",
    "diamond",
    "plus",
    "ring",
)


def synthetic_mark(pattern: int, m: int) -> np.ndarray:
    """The ``(m, m)`` boolean mask of class ``pattern``'s mark.

    Every pattern is left-right symmetric (``left_right`` up to its polarity), so a horizontal flip never
    turns one class into another; every pattern covers about half of the mark, so the mark's mean colour
    does not depend on the class.
    """
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float64) + 0.5
    c, u = m / 2.0, m / 4.0
    dy, dx = yy - c, xx - c
    r = np.hypot(dy, dx)
    masks = (
        (yy // u) % 2 == 0,
        (xx // u) % 2 == 0,
        ((yy // u) + (xx // u)) % 2 == 0,
        yy < c,
        xx < c,
        (np.maximum(np.abs(dy), np.abs(dx)) // (m / 8.0)) % 2 == 0,
        r < 0.4 * m,
        np.abs(dy) + np.abs(dx) < c,
        (np.abs(dy) < m / 6.0) | (np.abs(dx) < m / 6.0),
        (r > 0.2 * m) & (r < 0.45 * m),
    )
    return masks[pattern]


def sample_synthetic_params(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Draw everything about one synthetic image except its class (so no global cue carries the class)."""
    s = size
    low = rng.uniform(30, 225, size=(4, 4, 3)).astype(np.uint8)
    background = np.asarray(Image.fromarray(low).resize((s, s), Image.BILINEAR), dtype=np.float32)
    background = background + rng.normal(0.0, 8.0, size=(s, s, 3)).astype(np.float32)
    cx, cy = rng.uniform(0.38, 0.62, size=2) * s
    a, b = rng.uniform(0.28, 0.38, size=2) * s
    theta = rng.uniform(0, math.pi)
    m = max(6, round(MARK_FRACTION * s))
    # the mark's centre lies inside the object's inner half, and the mark inside the image
    rho, phi = math.sqrt(rng.uniform(0, 1)) * 0.5, rng.uniform(0, 2 * math.pi)
    ex, ey = rho * a * math.cos(phi), rho * b * math.sin(phi)
    mx = cx + ex * math.cos(theta) - ey * math.sin(theta)
    my = cy + ex * math.sin(theta) + ey * math.cos(theta)
    x0 = int(np.clip(round(mx - m / 2), 0, s - m))
    y0 = int(np.clip(round(my - m / 2), 0, s - m))
    n_distractors = N_DISTRACTORS
    return {
        "background": background,
        "object": (cx, cy, a, b, theta),
        "object_colour": rng.uniform(40, 215, size=3),
        "shading": rng.uniform(-0.25, 0.25, size=2),
        "mark_box": (y0, x0, m),
        # a dark and a light colour: the pattern always has contrast and a fixed polarity, and as the two
        # are symmetric about mid-grey the mark's mean colour is the same for every class
        "mark_dark": rng.uniform(0, 70, size=3),
        "mark_light": rng.uniform(185, 255, size=3),
        "distractors": [
            (int(rng.integers(0, s - m + 1)), int(rng.integers(0, s - m + 1)), rng.uniform(0, 255, size=3))
            for _ in range(n_distractors)
        ],
        "gain": rng.uniform(0.8, 1.2, size=3),
    }


def sample_coarse_params(rng: np.random.Generator, size: int, label: int) -> dict[str, Any]:
    """Parameters of one image of the ``coarse`` task, class ``label`` (shape ``label // 2``, texture
    ``label % 2``, see :data:`COARSE_CLASSES`): the same random scene as :func:`sample_synthetic_params`
    (background, object pose and colour, distractor squares, gain) with the object's shape and, for ``stripes``,
    a striped background set by the class, and no class mark (``mark_box`` None)."""
    params = sample_synthetic_params(rng, size)
    stripes = {"angle": rng.uniform(0, math.pi), "period": rng.uniform(0.08, 0.16) * size,
               "amplitude": rng.uniform(25, 45)}
    return {**params, "shape": COARSE_SHAPES[label // len(COARSE_TEXTURES)],
            "stripes": stripes if COARSE_TEXTURES[label % len(COARSE_TEXTURES)] == "stripes" else None,
            "mark_box": None, "distractor_size": params["mark_box"][2]}


def object_mask(shape: str, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inside-mask of the object in its own frame (``u`` along the long axis ``a``, ``v`` along ``b``):
    ``ellipse`` with semi-axes a, b; ``rectangle`` with half-sides 0.85 a, 0.85 b; ``triangle`` with its apex
    at v = -1.1 b and its base of half-width 1.1 a at v = 1.1 b (areas 3.1, 2.9 and 2.4 a·b)."""
    if shape == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 0.85 * a) & (np.abs(v) <= 0.85 * b)
    if shape == "triangle":
        h = 1.1 * b
        return (v <= h) & (np.abs(u) <= 1.1 * a * (v + h) / (2 * h))
    raise ValueError(f"synthetic: unknown object shape {shape!r}; expected one of {COARSE_SHAPES}")


def render_synthetic(params: dict[str, Any], label: int) -> np.ndarray:
    """Render one ``(S, S, 3)`` uint8 image: textured background (striped when ``params['stripes']`` says so),
    a large jittered object (``params['shape']``, default ellipse), two solid distractor squares and, on the
    object, the class mark drawn in a random dark and a random light colour (none when ``mark_box`` is None:
    the ``coarse`` task, whose class is in the shape and texture instead)."""
    img = params["background"].copy()
    s = img.shape[0]
    cx, cy, a, b, theta = params["object"]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    stripes = params.get("stripes")
    if stripes is not None:
        phase = xx * math.cos(stripes["angle"]) + yy * math.sin(stripes["angle"])
        img = img + (stripes["amplitude"] * np.sin(2 * math.pi * phase / stripes["period"]))[..., None]
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    inside = object_mask(params.get("shape", "ellipse"), u, v, a, b)
    gx, gy = params["shading"]
    shade = 1.0 + gx * (xx - cx) / s + gy * (yy - cy) / s
    img[inside] = (params["object_colour"][None, None, :] * shade[..., None])[inside]
    box = params["mark_box"]
    d = box[2] if box is not None else params["distractor_size"]
    for dy0, dx0, colour in params["distractors"]:
        img[dy0 : dy0 + d, dx0 : dx0 + d] = colour
    if box is not None:
        y0, x0, m = box
        mask = synthetic_mark(label, m)
        img[y0 : y0 + m, x0 : x0 + m] = np.where(mask[..., None], params["mark_dark"], params["mark_light"])
    img = img * params["gain"][None, None, :]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class SyntheticFGVC(FGVCDataset):
    """A procedurally generated fine-grained set for demos and smoke tests (no files, no download).

    Task ``mark`` (default): all classes share the global appearance (random textured background, a large
    ellipse of random colour, pose and shading, two solid distractor squares, per-channel gain); they differ only
    in the pattern of a small two-colour mark (about 5% of the image) placed at a random spot on the object. The
    mark's dark and light colours are random and class-independent, so no colour statistic predicts the class:
    a model has to find the mark and read its pattern. ``mark_boxes[i]`` is image ``i``'s mark as ``(y0, x0, m)``
    (top, left, side in pixels of the generated ``image_size`` image), so that what a model attends to can be
    scored against it (:mod:`dcal.mechanism`).

    Task ``coarse``: a generic pre-training set drawn by the same renderer without any mark: the class is the
    object's shape (ellipse, rectangle, triangle) times the background's texture (smooth, stripes), up to 6
    classes (:data:`COARSE_CLASSES`); ``mark_boxes`` is None. A model trained on it learns the scene's generic
    features and nothing about the marks.

    Images are generated in memory at construction, deterministically from ``seed``; train and test, and the
    two tasks, use different random streams.
    """

    def __init__(
        self,
        split: str,
        num_classes: int = 6,
        train_per_class: int = 100,
        test_per_class: int = 30,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable | None = None,
        task: str = "mark",
    ) -> None:
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"synthetic: task must be one of {SYNTHETIC_TASKS}, got {task!r}")
        names = SYNTHETIC_PATTERNS if task == "mark" else COARSE_CLASSES
        if not 2 <= num_classes <= len(names):
            raise ValueError(f"synthetic: num_classes must be in 2..{len(names)} for task {task!r}, got {num_classes}")
        if image_size < 24:
            raise ValueError(f"synthetic: image_size must be >= 24, got {image_size}")
        per_class = train_per_class if split == "train" else test_per_class
        if per_class < 1:
            raise ValueError(f"synthetic: {split}_per_class must be >= 1, got {per_class}")
        # the mark task keeps its original stream (its images do not change); coarse has its own
        rng = np.random.default_rng([seed, SPLITS.index(split)] + ([1] if task == "coarse" else []))
        # interleaved labels 0,1,..,C-1,0,1,.. so that any prefix is balanced
        targets = [i % num_classes for i in range(num_classes * per_class)]
        if task == "mark":
            params = [sample_synthetic_params(rng, image_size) for _ in targets]
        else:
            params = [sample_coarse_params(rng, image_size, t) for t in targets]
        self.images = np.stack([render_synthetic(p, t) for p, t in zip(params, targets, strict=True)])
        self._mark_boxes = [p["mark_box"] for p in params] if task == "mark" else None
        paths = [f"synthetic://{split}/{i:06d}" for i in range(len(targets))]
        super().__init__("synthetic", split, paths, targets, list(names[:num_classes]), transform, root=None)
        self.image_size = image_size
        self.seed = seed
        self.task = task

    def _generated(self, index: int) -> int:
        # by the number in the path, not the position: a class subset (dcal.data.subsets) keeps the paths
        return int(self.paths[index].rsplit("/", 1)[1])

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[self._generated(index)])

    @property
    def mark_boxes(self) -> list[tuple[int, int, int]] | None:
        """Each sample's mark as ``(y0, x0, m)``; None for the coarse task."""
        if self._mark_boxes is None:
            return None
        return [self._mark_boxes[self._generated(i)] for i in range(len(self.paths))]


# ----------------------------------------------------------------------------------------------------------


def read_synthetic(root: Any, split: str, transform: Callable | None = None, **options: Any) -> SyntheticFGVC:
    """The generated set (``root`` is ignored); ``options`` are :class:`SyntheticFGVC`'s."""
    return SyntheticFGVC(split, transform=transform, **options)


def build_fgvc_dataset(
    name: str, root: str | os.PathLike | None, split: str, transform: Callable | None = None, **kwargs: Any
) -> FGVCDataset:
    """Build an FGVC dataset: :func:`dcal.data.build_dataset` for a dataset registered with task ``fgvc``.

    Args:
        name: ``cub`` (folder holding ``CUB_200_2011`` or that folder), ``cars`` (folder holding
            ``stanford_cars`` or that folder, devkit layout), ``aircraft`` (folder holding
            ``fgvc-aircraft-2013b``, that folder or its ``data``), ``folder`` (``root/{train,test}/<class>/``)
            or ``synthetic`` (generated in memory; ``root`` is ignored and may be None).
        root: dataset folder.
        split: ``train`` or ``test`` (Aircraft: ``train`` = the official ``trainval``).
        transform: applied to each PIL RGB image.
        **kwargs: ``aircraft``: ``annotation_level`` (variant|family|manufacturer, default variant);
            ``synthetic``: ``num_classes`` (6), ``train_per_class`` (100), ``test_per_class`` (30),
            ``image_size`` (64), ``seed`` (0), ``task`` (``mark`` | ``coarse``, see :class:`SyntheticFGVC`).

    Raises:
        DatasetFormatError: the layout on disk is not the one expected (missing or malformed index file,
            listed image missing); the message names the file.
    """
    if name not in dataset_names("fgvc"):
        raise ValueError(f"unknown FGVC dataset {name!r}; expected one of {dataset_names('fgvc')}")
    return build_dataset(name, root, split, transform, **kwargs)
