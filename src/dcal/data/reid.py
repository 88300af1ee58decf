"""Re-identification datasets: Market-1501, DukeMTMC-reID, MSMT17 (V1/V2), VeRi-776 and a custom layout.

Conventions (those of torchreid / fast-reid, so that numbers are comparable with the literature):

* Splits are ``train`` (``bounding_box_train``), ``query`` and ``gallery`` (``bounding_box_test``).
* Identity ``-1`` (Market/Duke "junk" images) is dropped from every split; identity ``0`` (Market's
  distractors) is kept, so the gallery holds the 2,793 distractor images as the protocol wants.
* Camera ids are 0-based (``c1`` in a file name becomes camid 0).
* Training pids are relabelled to ``0..P-1`` in the order of the sorted original pids (``original_pids``
  keeps the old ones); query and gallery keep their original pids so that they can be matched.
* Images are listed in sorted path order, so every split is deterministic.

``__getitem__`` returns ``(image, pid, camid)`` with ``image`` the RGB PIL image passed through
``transform`` when one is given. Use :func:`build_reid_dataset` (or :func:`dcal.data.build_dataset`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dcal.data.images import IMAGE_EXTENSIONS, list_image_files, list_subfolders, open_rgb
from dcal.data.layout import DatasetFormatError, DatasetNotFoundError, find_dataset_root
from dcal.data.registry import SPLITS, build_dataset, dataset_names

__all__ = [
    "REID_SPLITS",
    "IMAGE_EXTENSIONS",
    "ReIDDatasetError",
    "ReIDFileNameError",
    "EmptySplitError",
    "NoCommonIdentityError",
    "ReIDDataset",
    "build_reid_dataset",
    "check_query_gallery",
    "describe_splits",
]

REID_SPLITS = SPLITS["reid"]

MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")
VERI_PATTERN = re.compile(r"([\d]+)_c(\d\d\d)")
# ``c<digits>`` at the start of the name or right after a separator (``_``, ``-``, ``.``, space).
FOLDER_CAMERA_PATTERN = re.compile(r"(?:^|[_\-. ])c(\d+)")
MSMT_CAMERA_TOKEN = re.compile(r"^[-\d]+_c(\d+)")


class ReIDDatasetError(DatasetFormatError):
    """Base class of the content errors of a re-id dataset (bad names, empty splits, ...)."""


class ReIDFileNameError(ReIDDatasetError):
    """A file name (or list line) does not follow the layout's naming pattern."""


class EmptySplitError(ReIDDatasetError):
    """A split holds no usable image."""


class NoCommonIdentityError(ReIDDatasetError):
    """No query identity can be found in the gallery (under another camera), so nothing can be evaluated."""


class ReIDDataset(Dataset):
    """One split of a re-id dataset: a list of ``(path, pid, camid)`` samples.

    Attributes:
        paths, pids, camids: per-sample lists (``pids`` relabelled to ``0..P-1`` for ``train``).
        targets: the same list as ``pids`` (what samplers and the engine read).
        original_pids: the pids as written on disk (equal to ``pids`` for query/gallery).
        num_classes: number of distinct pids in this split (the classifier size for ``train``).
        num_cameras: number of distinct camera ids in this split (torchreid's "# cameras").
        name, split, root: where it came from.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int, int]],
        *,
        name: str,
        split: str,
        root: str | os.PathLike,
        transform: Callable | None = None,
        relabel: bool | None = None,
    ) -> None:
        if not samples:
            raise EmptySplitError(f"{name}/{split}: no usable image found under {root}")
        self.name = name
        self.split = split
        self.root = str(root)
        self.transform = transform
        self.paths: list[str] = [str(s[0]) for s in samples]
        self.original_pids: list[int] = [int(s[1]) for s in samples]
        self.camids: list[int] = [int(s[2]) for s in samples]
        relabel = split == "train" if relabel is None else relabel
        if relabel:
            self.pid2label = {pid: i for i, pid in enumerate(sorted(set(self.original_pids)))}
            self.pids: list[int] = [self.pid2label[p] for p in self.original_pids]
        else:
            self.pid2label = {}
            self.pids = list(self.original_pids)
        self.targets = self.pids
        self.num_classes = len(set(self.pids))
        self.num_cameras = len(set(self.camids))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = open_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.pids[index], self.camids[index]

    def describe(self) -> str:
        """A torchreid-style summary line block: ids, images and cameras of this split."""
        return describe_splits([self], title=f"{self.name} ({self.root})")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, ids={self.num_classes}, "
            f"images={len(self)}, cameras={self.num_cameras}, root={self.root!r})"
        )


def describe_splits(datasets: Iterable[ReIDDataset], title: str | None = None) -> str:
    """Summary table of several splits, like torchreid's ``show_summary``::

        subset   | # ids | # images | # cameras
        train    |   751 |    12936 |         6
    """
    rule = "  " + "-" * 40
    lines = [f"=> {title}"] if title else []
    lines += [rule, "  subset   | # ids | # images | # cameras", rule]
    for d in datasets:
        lines.append(f"  {d.split:<8} | {d.num_classes:5d} | {len(d):8d} | {d.num_cameras:9d}")
    lines.append(rule)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- Market / Duke
_MARKET_LIKE = {
    # name: (display name, conventional sub-folders, number of cameras)
    "market1501": (
        "Market-1501",
        ("Market-1501-v15.09.15", "market1501", "Market-1501", "market1501/Market-1501-v15.09.15"),
        6,
    ),
    "dukemtmc": (
        "DukeMTMC-reID",
        ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid", "dukemtmc", "dukemtmc-reid/DukeMTMC-reID"),
        8,
    ),
}
_MARKET_SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _parse_named_dir(
    folder: Path, what: str, pattern: re.Pattern, example: str, max_cam: int
) -> list[tuple[str, int, int]]:
    """(path, pid, 0-based camid) of every image in ``folder`` whose name ``pattern`` parses as (pid, camera);
    junk pid -1 is skipped; a name that does not parse, or an out-of-range pid/camera, is an error naming it."""
    samples = []
    for path in list_image_files(folder, recursive=False):
        m = pattern.search(path.name)
        if m is None:
            raise ReIDFileNameError(
                f"{what}: cannot parse {path}: expected a name matching '{pattern.pattern}' such as {example}"
            )
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue  # junk images are ignored, as in every reference loader
        if pid < -1 or not 1 <= cam <= max_cam:
            raise ReIDFileNameError(
                f"{what}: {path}: pid {pid} / camera c{cam} out of range (pid >= -1, camera 1..{max_cam})"
            )
        samples.append((str(path), pid, cam - 1))
    return samples


def _market_like(name: str, root: str | os.PathLike, split: str) -> tuple[Path, list[tuple[str, int, int]]]:
    display, candidates, max_cam = _MARKET_LIKE[name]
    sub = _MARKET_SPLIT_DIRS[split]
    base = find_dataset_root(root, candidates, list(_MARKET_SPLIT_DIRS.values()), display)
    example = "0002_c1s1_000451_03.jpg (pid, then camera)"
    return base, _parse_named_dir(base / sub, f"{display}/{split}", MARKET_PATTERN, example, max_cam)


# --------------------------------------------------------------------------------------------- MSMT17
_MSMT_VERSIONS = {
    # folder names of the images: (train, test)
    "V1": ("train", "test"),
    "V2": ("mask_train_v2", "mask_test_v2"),
}
_MSMT_LISTS = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt",
               "gallery": "list_gallery.txt"}


def _msmt_camid(relpath: str, list_file: Path, lineno: int) -> int:
    """0-based camera of an MSMT17 image: ``_cXX`` after the pid, else the 3rd ``_`` field (torchreid)."""
    base = os.path.basename(relpath)
    m = MSMT_CAMERA_TOKEN.match(base)
    if m is not None:
        cam = int(m.group(1))
    else:
        fields = base.split("_")
        try:
            cam = int(fields[2])
        except (IndexError, ValueError):
            raise ReIDFileNameError(
                f"MSMT17: {list_file}:{lineno}: cannot read the camera of {relpath!r}: expected "
                "<pid>_<index>_<camera>_... (e.g. 0000/0000_000_01_0303morning_0015_0.jpg) "
                "or <pid>_c<camera>_..."
            ) from None
    if not 1 <= cam <= 15:
        raise ReIDFileNameError(f"MSMT17: {list_file}:{lineno}: camera {cam} of {relpath!r} is not in 1..15")
    return cam - 1


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[tuple[str, int, int]]:
    samples = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise ReIDFileNameError(
                    f"MSMT17: {list_file}:{lineno}: expected '<relative/path.jpg> <pid>', got {line!r}"
                )
            relpath, pid = parts[0], int(parts[1])
            camid = _msmt_camid(relpath, list_file, lineno)
            if pid == -1:
                continue
            samples.append((str(image_dir / relpath), pid, camid))
    if samples and not os.path.exists(samples[0][0]):
        raise DatasetNotFoundError(
            f"MSMT17: {samples[0][0]} (first entry of {list_file}) does not exist: "
            "wrong root or image folder?"
        )
    return samples


def _msmt17(
    root: str | os.PathLike, split: str, val_in_train: bool = True
) -> tuple[Path, list[tuple[str, int, int]]]:
    candidates = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2")
    lists = list(_MSMT_LISTS.values())
    base = None
    for _version, (train_dir, test_dir) in _MSMT_VERSIONS.items():
        try:
            base = find_dataset_root(root, candidates, [train_dir, test_dir] + lists, "MSMT17")
            break
        except DatasetNotFoundError as e:
            error = e
    if base is None:
        raise DatasetNotFoundError(
            f"{error} (V1 layout; the V2 layout has mask_train_v2/ and mask_test_v2/ "
            "instead of train/ and test/)"
        )
    train_dir, test_dir = next(v for v in _MSMT_VERSIONS.values() if (base / v[0]).is_dir())
    if split == "train":
        samples = _read_msmt_list(base / _MSMT_LISTS["train"], base / train_dir)
        if val_in_train:
            samples += _read_msmt_list(base / _MSMT_LISTS["val"], base / train_dir)
    else:
        samples = _read_msmt_list(base / _MSMT_LISTS[split], base / test_dir)
    return base, samples


# ---------------------------------------------------------------------------------------------- VeRi
_VERI_SPLIT_DIRS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}


def _veri(root: str | os.PathLike, split: str) -> tuple[Path, list[tuple[str, int, int]]]:
    candidates = ("VeRi", "veri", "VeRi-776", "VeRi776", "veri776")
    base = find_dataset_root(root, candidates, list(_VERI_SPLIT_DIRS.values()), "VeRi-776")
    example = "0001_c001_00016450_0.jpg (vehicle id, then 3-digit camera)"
    return base, _parse_named_dir(base / _VERI_SPLIT_DIRS[split], f"VeRi-776/{split}", VERI_PATTERN, example, 20)


# --------------------------------------------------------------------------------------- reid_folder
def _reid_folder(
    root: str | os.PathLike, split: str, camera_base: int = 1, default_camid: int | None = None
) -> tuple[Path, list[tuple[str, int, int]]]:
    base = Path(root).expanduser()
    folder = base / split
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"reid_folder: {folder} does not exist; expected {base}/{{train,query,gallery}}/<pid>/<image>"
        )
    loose = list_image_files(folder, recursive=False)
    if loose:
        raise ReIDFileNameError(
            f"reid_folder: {loose[0]} lies directly in {folder}; put each image in a sub-folder named "
            "after its integer identity: <split>/<pid>/<image>"
        )
    samples = []
    for entry in (folder / name for name in list_subfolders(folder)):
        if not re.fullmatch(r"-?\d+", entry.name):
            raise ReIDFileNameError(
                f"reid_folder: identity folder {entry} is not an integer; name identity folders by their "
                "integer pid (e.g. 0007; -1 = junk, ignored)"
            )
        pid = int(entry.name)
        if pid == -1:
            continue
        for path in list_image_files(entry, recursive=False):
            m = FOLDER_CAMERA_PATTERN.search(path.stem)
            if m is not None:
                camid = int(m.group(1)) - camera_base
                if camid < 0:
                    raise ReIDFileNameError(
                        f"reid_folder: {path}: camera c{m.group(1)} is below camera_base={camera_base}"
                    )
            elif default_camid is not None:
                camid = int(default_camid)
            else:
                raise ReIDFileNameError(
                    f"reid_folder: {path}: no camera token in the file name; expected 'c<digits>' at the "
                    "start of the name or after '_', '-', '.' or ' ' (e.g. 0007_c2_000123.jpg), "
                    "or pass default_camid"
                )
            samples.append((str(path), pid, camid))
    return base, samples


# ---------------------------------------------------------------------------------- the registered readers
def _reid_set(
    name: str, split: str, found: tuple[Path, list[tuple[str, int, int]]], transform: Callable | None
) -> ReIDDataset:
    base, samples = found
    if not samples:
        raise EmptySplitError(f"{name}/{split}: no image found in {base} for this split")
    return ReIDDataset(samples, name=name, split=split, root=base, transform=transform)


def read_market1501(root: str | os.PathLike, split: str, transform: Callable | None = None) -> ReIDDataset:
    return _reid_set("market1501", split, _market_like("market1501", root, split), transform)


def read_dukemtmc(root: str | os.PathLike, split: str, transform: Callable | None = None) -> ReIDDataset:
    return _reid_set("dukemtmc", split, _market_like("dukemtmc", root, split), transform)


def read_msmt17(
    root: str | os.PathLike, split: str, transform: Callable | None = None, val_in_train: bool = True
) -> ReIDDataset:
    return _reid_set("msmt17", split, _msmt17(root, split, val_in_train=bool(val_in_train)), transform)


def read_veri(root: str | os.PathLike, split: str, transform: Callable | None = None) -> ReIDDataset:
    return _reid_set("veri", split, _veri(root, split), transform)


def read_reid_folder(
    root: str | os.PathLike, split: str, transform: Callable | None = None, camera_base: int = 1,
    default_camid: int | None = None,
) -> ReIDDataset:
    found = _reid_folder(root, split, camera_base=int(camera_base), default_camid=default_camid)
    return _reid_set("reid_folder", split, found, transform)


# ----------------------------------------------------------------------------------------------- API
def build_reid_dataset(
    name: str, root: str | os.PathLike, split: str, transform: Callable | None = None, **kwargs: Any
) -> ReIDDataset:
    """Read one split of a re-id dataset: :func:`dcal.data.build_dataset` for a dataset registered with task
    ``reid``.

    Args:
        name: ``market1501``, ``dukemtmc``, ``msmt17``, ``veri`` or ``reid_folder``.
        root: the folder holding the split folders, or its parent when the dataset folder has its
            conventional name (``Market-1501-v15.09.15``, ``market1501``, ``DukeMTMC-reID``, ``MSMT17_V1``,
            ``MSMT17_V2``, ``VeRi``...).
        split: ``train``, ``query`` or ``gallery``.
        transform: applied to each RGB PIL image.
        **kwargs: per layout:

            * ``msmt17``: ``val_in_train=True``: ``list_val.txt`` joins the training set, which then is the
              32,621 images / 1,041 ids every paper reports (torchreid's and TransReID's choice). Camera:
              the ``_cXX`` token after the pid if present, else the 3rd ``_``-separated field of the file
              name (``0000_000_01_...`` -> camera 1 -> camid 0), as torchreid reads it. The V2 layout
              (``mask_train_v2/``, ``mask_test_v2/``) is detected automatically.
            * ``reid_folder``: layout ``root/{train,query,gallery}/<pid>/<image>`` with integer identity
              folders (``-1`` = junk, skipped; ``0`` kept). The camera comes from the first ``c<digits>``
              token of the file name that starts the name or follows ``_``, ``-``, ``.`` or a space (so
              ``0007_c2s1_0001.jpg`` and ``img-c12.png`` work, ``disc3.jpg`` does not); camid =
              digits - ``camera_base`` (default 1, i.e. ``c1`` -> 0; pass ``camera_base=0`` for 0-based
              names). A file without the token is an error naming it unless ``default_camid`` is given;
              note that the protocol then drops same-identity gallery images of the *same* camera, so
              give query and gallery different ``default_camid`` values to keep cross-set matches.

    Raises:
        DatasetNotFoundError: a folder or list file is missing (the message names it).
        ReIDFileNameError: a file name or list line does not follow the layout (names the file).
        EmptySplitError: the split holds no image.
    """
    if name not in dataset_names("reid"):
        raise ValueError(f"unknown re-id dataset {name!r}; expected one of {dataset_names('reid')}")
    if split not in REID_SPLITS:
        raise ValueError(f"unknown re-id split {split!r}; expected one of {REID_SPLITS}")
    return build_dataset(name, root, split, transform, **kwargs)


def check_query_gallery(query: Any, gallery: Any) -> dict[str, int]:
    """Check that a query set can be evaluated against a gallery; returns counts.

    ``query`` and ``gallery`` are re-id datasets (anything with ``pids`` and ``camids``). A query is
    *valid* when the gallery holds its identity under another camera (the standard protocol drops
    same-identity same-camera gallery images; junk pid -1 never matches).

    Returns:
        ``num_query``, ``num_gallery``, ``num_query_ids``, ``num_shared_ids`` (query ids present in the
        gallery), ``num_valid_queries`` and ``num_skipped_queries``.

    Raises:
        NoCommonIdentityError: no query has a valid match (e.g. query and gallery from different datasets).
    """
    q_pids, q_cams = list(query.pids), list(query.camids)
    g_pids, g_cams = list(gallery.pids), list(gallery.camids)
    gallery_cams: dict[int, set[int]] = {}
    for p, c in zip(g_pids, g_cams, strict=True):
        if p != -1:
            gallery_cams.setdefault(p, set()).add(c)
    shared = {p for p in set(q_pids) if p in gallery_cams}
    valid = sum(
        1 for p, c in zip(q_pids, q_cams, strict=True) if p in gallery_cams and gallery_cams[p] - {c}
    )
    qname = f"{getattr(query, 'name', 'query')}/{getattr(query, 'split', 'query')}"
    gname = f"{getattr(gallery, 'name', 'gallery')}/{getattr(gallery, 'split', 'gallery')}"
    if not shared:
        raise NoCommonIdentityError(
            f"none of the {len(set(q_pids))} identities of {qname} ({len(q_pids)} images) appears in {gname} "
            f"({len(set(g_pids))} ids, {len(g_pids)} images): query and gallery do not belong together"
        )
    if valid == 0:
        raise NoCommonIdentityError(
            f"{qname}: every query identity found in {gname} is there only under the query's own camera, "
            "which the protocol excludes: no query can be evaluated"
        )
    return {
        "num_query": len(q_pids),
        "num_gallery": len(g_pids),
        "num_query_ids": len(set(q_pids)),
        "num_shared_ids": len(shared),
        "num_valid_queries": valid,
        "num_skipped_queries": len(q_pids) - valid,
    }
