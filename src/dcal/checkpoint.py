"""Checkpoints: full training state (``last.pth``/``best.pth``) and weights-only ``.safetensors`` exports.

Writes are atomic (temporary file in the same folder, fsync, rename, fsync of the folder), so a checkpoint is
never seen half-written, even when the process is killed during the save: the previous file stays until the new
one is complete on disk. Reads use ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and plain
Python values only (the RNG states included), so a file cannot run code. Every file carries the resolved
config, so ``dcal eval --checkpoint FILE`` can rebuild the model alone.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_VERSION = 2  # 2: RNG states as plain values (weights_only loading), mid-epoch position
TMP_SUFFIX = ".tmp"
MAX_LISTED = 20  # keys listed per kind of mismatch in an error message
# checkpoints of version 1 kept NumPy's RNG state as an array: allow exactly what rebuilds one (no code runs)
_OLD_RNG_GLOBALS = [np.dtype, np.ndarray, np.dtypes.UInt32DType,
                    (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the model (another backbone, image size or class count)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# read once at import (reading it sets it for a moment, which other threads could see)
FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file; mkstemp's files are 0600


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` then make ``tmp`` durable and rename it onto ``path`` (readers see old or new, never half).

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:  # a full disk, a read-only folder: name the file meant, not its temporary
        if e.errno is not None and (e.filename is None or str(e.filename).endswith(TMP_SUFFIX)):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None: a number that is not there is ``null``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = 2, default: Any = None) -> str:
    """``value`` as strict JSON, one line when ``indent`` is None: non-finite floats are written as ``null``
    (:func:`finite_json`), never as the ``NaN`` / ``Infinity`` literals that JSON readers reject. The one way dcal
    writes JSON."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False, default=default) + "\n"


def read_versioned_json(path: Path, fmt: str, newest: int, what: str, version_key: str = "version",
                        error: type[Exception] = ValueError, max_bytes: int = 64 << 20) -> dict[str, Any]:
    """The reader of dcal's versioned JSON files (index and shard-set manifests): the object in ``path``, or a
    one-line ``error`` naming the file when it is larger than ``max_bytes``, not JSON, not of format ``fmt``, or of a
    ``version_key`` newer than ``newest`` (written by a later dcal)."""
    from dcal import __version__

    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, more than a {what} holds ({max_bytes} at most)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a {what} (format {fmt!r} expected)")
    version = data.get(version_key)
    if not isinstance(version, int) or isinstance(version, bool):
        raise error(f"{path}: {version_key} {version!r} is not an integer")
    if version > newest:
        raise error(f"{path}: written by dcal {data.get('dcal_version', '?')} in {what} format {version}; this dcal "
                    f"({__version__}) reads format {newest}: upgrade dcal")
    return data


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a save killed mid-write left in ``folder``; returns them."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
             int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, **state: Any) -> None:
    """Save a training state dict (model, optimizer, scheduler, criterion, epoch, config, ...) + RNG states
    (``state`` may bring its own ``rng``, e.g. every process's)."""
    payload = {"version": CHECKPOINT_VERSION, "rng": rng_state(), **state}
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # through Python's file: a full disk is an OSError (ENOSPC), not a C++ error
            torch.save(payload, f)

    atomic_write(Path(path), write)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (``EOFError()``)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def check_torch_archive(path: Path, what: str = "checkpoint", require_zip: bool = True) -> None:
    """Refuse a ``torch.save`` zip archive whose entries are compressed or larger in all than the file: torch.save
    stores them uncompressed, and torch.load inflates compressed ones, so such a file could make a few kilobytes
    allocate gigabytes. ``require_zip``: also refuse files that are not zip archives (empty, truncated, the
    pre-1.6 format, another format)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        if require_zip:
            raise ValueError(f"{what} {str(path)!r} is truncated or not a PyTorch checkpoint (not the zip archive "
                             f"torch.save writes: {first_line(e)})") from e
        return
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed or sum(e.file_size for e in entries) > path.stat().st_size:
        raise ValueError(f"{what} {str(path)!r} holds compressed entries ({', '.join(compressed[:3]) or 'sizes'}"
                         "): not written by torch.save; refused, it could expand far beyond its size")


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A ``.pth`` training checkpoint, read with ``torch.load(weights_only=True)`` (no code runs); a file that is
    not one (empty, truncated, another format, compressed, pickled objects) is refused in one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    check_torch_archive(path)
    try:
        with torch.serialization.safe_globals(_OLD_RNG_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint "
                             f"({first_line(e)})") from e
        raise ValueError(
            f"checkpoint {str(path)!r} holds pickled objects other than tensors and plain values; refused "
            "(it is read with weights_only=True, so no code in it runs; a file saved by another tool may hold them)"
        ) from e
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors of a damaged file, re-raised naming it
        raise ValueError(f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint "
                         f"({first_line(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a dcal training checkpoint: it holds a "
                         f"{type(state).__name__}")
    missing = [k for k in ("model", "config") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a dcal training checkpoint: it lacks {missing}")
    model, config = state["model"], state["config"]
    if not isinstance(config, str) or not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ValueError(f"checkpoint {str(path)!r} is not a dcal training checkpoint: 'model' must map names to "
                         "tensors and 'config' must be YAML text")
    if not isinstance(state.get("extra", {}), dict):
        raise ValueError(f"checkpoint {str(path)!r}: its 'extra' (class names, ...) must be a mapping, got "
                         f"{type(state['extra']).__name__}")
    return state


def mismatches(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps a state of tensor ``shapes`` from loading into ``model``: the keys the state lacks or has in
    excess and every shape that differs (state vs model), as message parts; empty when it fits."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    differ = [f"{k}: checkpoint {shapes[k]} vs model {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
    return [f"{len(items)} {what}: " + ", ".join(items[:MAX_LISTED]) +
            (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
            for what, items in (("shape mismatch(es)", differ), ("key(s) missing from the checkpoint", missing),
                                ("unexpected key(s) in the checkpoint", unexpected)) if items]


def check_fits(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """A :class:`CheckpointMismatchError` listing :func:`mismatches` unless a state of ``shapes`` fits ``model``
    (which may live on the ``meta`` device: only shapes are compared)."""
    parts = mismatches(model, shapes)
    if parts:
        raise CheckpointMismatchError(
            f"checkpoint {str(source)!r} does not fit this model (another backbone, image size or class count?): "
            + " | ".join(parts)
        )


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or inf (a damaged or diverged file would load without a word and predict
    ``nan``): ``ValueError`` naming the file and the first such tensor."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {bad} NaN or inf value(s) of {t.numel()}: the weights "
                             "are damaged or come from a diverged run")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)``, or a :class:`CheckpointMismatchError` that lists every key the
    checkpoint lacks or has in excess and every shape that differs (checkpoint vs model); weights that are
    not finite are refused (:func:`check_finite`)."""
    check_fits(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    check_finite(state, source)
    model.load_state_dict(state)


def export_weights(
    path: str | Path, model: torch.nn.Module, config_yaml: str, extra: dict[str, Any] | None = None
) -> None:
    """Weights only, as safetensors, with the run's config (and ``extra``, e.g. class names) in the metadata; LoRA
    adapters merged into the weights (the plain model's keys: :func:`dcal.model.finetune.merged_state_dict`)."""
    from dcal.model.finetune import merged_state_dict

    tensors = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(model).items()}
    save_safetensors(path, tensors, {"format": "dcal", "config": config_yaml, "extra": json.dumps(extra or {})})


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _safetensors_error(path: Path, e: Exception) -> ValueError:
    return ValueError(f"weights file {str(path)!r} is truncated or not a safetensors file ({first_line(e)})")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file (no tensor is read); a damaged file is refused naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - SafetensorError (header), OSError: re-raised naming the file
        raise _safetensors_error(path, e) from e


def export_extra(path: str | Path, meta: dict[str, str]) -> dict[str, Any]:
    """The ``extra`` mapping :func:`export_weights` stored (class names, ...), checked."""
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"weights file {str(path)!r}: its 'extra' metadata is not JSON ({e})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"weights file {str(path)!r}: its 'extra' metadata is not a JSON object")
    return extra


class StoredModel:
    """A model file's config text and tensor shapes, read without reading a ``.safetensors`` file's tensors: the
    model it describes can be checked against the shapes (on the ``meta`` device) before any memory is spent, so
    a small file cannot make dcal allocate more than it holds. :meth:`state_dict` then reads the tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} does not exist")
        self._state: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors":
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    meta = dict(f.metadata() or {})
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            except Exception as e:  # noqa: BLE001 - SafetensorError (header), OSError: re-raised naming the file
                raise _safetensors_error(self.path, e) from e
            if "config" not in meta:
                raise ValueError(f"{str(self.path)!r} has no dcal config in its metadata (not written by dcal train)")
            self.config_yaml = meta["config"]
            self.extra = export_extra(self.path, meta)
        else:
            ckpt = load_training_state(self.path)
            self._state, self.config_yaml, self.extra = ckpt["model"], ckpt["config"], ckpt.get("extra") or {}
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    self._state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
            except Exception as e:  # noqa: BLE001 - the file changed or a tensor is damaged
                raise _safetensors_error(self.path, e) from e
        return self._state
