"""Reading image files: the one home of which names count as images, how folders are listed and how a file becomes
an RGB picture. Every dataset reader and every command (``predict``, ``embed``, ``search``, ``visualize``) goes
through here, so a file that trains is also one that predicts, and the other way round.

* :data:`IMAGE_EXTENSIONS`, :func:`is_image_file` - by name (case-insensitive extension).
* :func:`list_image_files`, :func:`list_subfolders` - sorted listings that skip hidden entries, never open a FIFO,
  socket or device (those are skipped by name with a warning) and do not follow a symbolic link to a folder that
  lies inside (or above) the folder being listed: such a link would list images twice or loop forever.
* :func:`open_rgb` - a regular file decoded in full (a truncated file fails here, naming the reason), turned upright
  by its EXIF orientation and converted to 8-bit RGB by the range of its pixel type (16-bit grey is scaled, not
  clipped to white; transparent pixels are laid on white).
* :func:`printable`, :func:`safe_file_name` - names as text that can always be written (file names that are not
  UTF-8 included) and as output file names that fit the 255-byte limit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dcal.vocabulary import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)
MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems
WHITE = (255, 255, 255)


class ImageReadError(OSError):
    """A path that cannot be read as an image for a reason found before decoding (not a regular file)."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the name ends with one of :data:`IMAGE_EXTENSIONS` (any case); the content is not looked at."""
    return os.fsdecode(path).lower().endswith(IMAGE_EXTENSIONS)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _loops_into(entry: os.DirEntry, tree: str) -> str | None:
    """For a symbolic link to a folder: its real target when that lies inside ``tree`` or above it, else None."""
    if not entry.is_symlink():
        return None
    target = os.path.realpath(entry.path)
    return target if _within(target, tree) or _within(tree, target) else None


def _skip_link(path: str, target: str, tree: str) -> None:
    logger.warning("skipped %s: a symbolic link to %s, inside (or above) %s (following it would read images twice "
                   "or loop)", printable(path), printable(target), printable(tree))


def list_subfolders(folder: str | os.PathLike, tree: str | os.PathLike | None = None) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder``, sorted; a symbolic link to a folder inside or above
    ``tree`` (default ``folder``) is skipped with a warning (a class folder linked to its parent is not a class)."""
    real_tree = os.path.realpath(tree if tree is not None else folder)
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            target = _loops_into(entry, real_tree)
            if target is not None:
                _skip_link(entry.path, target, real_tree)
                continue
            names.append(entry.name)
    return sorted(names)


def list_image_files(folder: str | os.PathLike, recursive: bool = True,
                     tree: str | os.PathLike | None = None) -> list[Path]:
    """The image files (by name) in ``folder`` (and below it when ``recursive``), sorted by path.

    Hidden entries (``.name``, e.g. macOS ``._x.jpg``) are left out. An entry with an image name that is not a
    regular file (a FIFO, a socket, a device, a broken link) is skipped with a warning and never opened. Symbolic
    links to folders are followed unless they point inside or above ``tree`` (default ``folder``), and no folder
    is visited twice, so a link loop cannot make the listing endless.
    """
    real_tree = os.path.realpath(tree if tree is not None else folder)
    found: list[str] = []
    st = os.stat(folder)
    visited = {(st.st_dev, st.st_ino)}
    pending = [os.fspath(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not recursive:
                        continue
                    target = _loops_into(entry, real_tree)
                    if target is not None:
                        _skip_link(entry.path, target, real_tree)
                        continue
                    est = entry.stat()
                    if (est.st_dev, est.st_ino) not in visited:  # reached twice through links outside the tree
                        visited.add((est.st_dev, est.st_ino))
                        pending.append(entry.path)
                elif is_image_file(entry.name):
                    if entry.is_file():
                        found.append(entry.path)
                    else:
                        try:
                            kind = _file_kind(os.stat(entry.path).st_mode)
                        except OSError:
                            kind = "a broken symbolic link"
                        logger.warning("skipped %s: %s, not a regular file", printable(entry.path), kind)
    return [Path(p) for p in sorted(found)]


# ------------------------------------------------------------------------------------------------- decoding
def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel integer or float pixels -> uint8, scaled by the range of their type.

    ``I;16*``: 0..65535 (value / 257). ``I`` (32-bit int, also what older Pillow gives for 16-bit PNGs): 0..255
    when every value fits, else 0..65535 when every value fits, else the image's own min..max. ``F``: 0..1 when
    every value fits, else 0..255, else min..max. A constant image outside those ranges becomes mid-grey.
    """
    v = values.astype(np.float64)
    if mode.startswith("I;16"):
        scale = (0.0, 65535.0)
    else:
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        ranges = ((0.0, 1.0), (0.0, 255.0)) if mode == "F" else ((0.0, 255.0), (0.0, 65535.0))
        scale = next((r for r in ranges if lo >= r[0] and hi <= r[1]), (lo, hi))
    span = scale[1] - scale[0]
    if span <= 0:
        return np.full(v.shape, 128, dtype=np.uint8)
    return np.clip(np.rint((v - scale[0]) * (255.0 / span)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: high-bit-depth grey scaled (not clipped), transparency laid on white,
    palette, CMYK, YCbCr, 1-bit and grey converted."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_8bit(np.asarray(image), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image, path: str) -> Image.Image:
    """The image turned by its EXIF orientation tag; as stored (with a warning) when the EXIF block is broken."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001 - Pillow raises several types on malformed EXIF; the pixels are fine
        logger.warning("%s: unreadable EXIF orientation (%s: %s); used as stored", printable(path), type(e).__name__, e)
        return image.copy()  # the caller closes the file: keep pixels that outlive it


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image, decoded in full.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: ``path`` is not a regular file (a FIFO, socket, device or folder), never opened.
        OSError (``PIL.UnidentifiedImageError``, "image file is truncated"), SyntaxError, ValueError: the file is
            not a readable image (what :data:`dcal.data.robust.BAD_IMAGE_ERRORS` catches).
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageReadError(f"{_file_kind(mode)}, not a regular file")
    with Image.open(path) as im:
        im.load()  # decode now: a truncated or corrupt file fails here, with its reason
        return to_rgb(_upright(im, os.fspath(path)))


# ---------------------------------------------------------------------------------------------------- names
def printable(name: str | bytes | os.PathLike) -> str:
    """A file name (or a message holding one) as text that always encodes as UTF-8: the bytes of a name that is
    not UTF-8 (which Python holds as surrogate escapes) are written as ``\\xff``; any other text is unchanged."""
    text = os.fspath(name)
    if isinstance(text, str):
        try:
            text = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.decode("utf-8", "backslashreplace")


def safe_file_name(stem: str, suffix: str = "", max_bytes: int = MAX_NAME_BYTES) -> str:
    """``stem + suffix`` as one file name: :func:`printable`, path separators replaced by ``_``, and when longer
    than ``max_bytes`` in UTF-8, the stem cut and followed by ``~`` and 8 hex digits of its hash (still unique)."""
    text = printable(stem).replace("/", "_").replace(os.sep, "_")
    name = text + suffix
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    tag = "~" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    room = max_bytes - len((tag + suffix).encode("utf-8"))
    cut = text.encode("utf-8")[:room].decode("utf-8", "ignore")  # never half a character
    return cut + tag + suffix
