"""Feature shard sets: a gallery embedded once, in pieces that survive a kill (``dcal embed --output FOLDER``).

A shard set is a folder: ``shards.json`` (what is embedded: the number of files and a digest of their sorted
list, the shard size, the feature dtype, the model and settings) and ``shard-000000.safetensors``, ... Shard ``i``
holds the features of files ``[i * shard_size, (i + 1) * shard_size)`` of the list, in the list's order, each
written atomically (:meth:`dcal.retrieval.FeatureSet.save`), so a shard on disk is complete. A killed run started
again with the same arguments finds the manifest equal, skips the shards that exist and embeds the others: no
image is embedded twice, none is missed. Under torchrun process ``r`` of ``W`` embeds shards ``r, r + W, ...``
into the same folder; the shards are the same as one process writes. When every shard exists the manifest is
rewritten with ``complete: true``, the counts and the dimension; only a complete set is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "dcal-feature-shards"
SHARDS_VERSION = 1
DEFAULT_SHARD_SIZE = 10_000
# what must be equal for a second run to continue a shard set (the rest is filled in at the end)
_RESUME_KEYS = ("files", "files_sha256", "shard_size", "dtype", "fusion", "after_bn", "flip", "checkpoint_sha256")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


def is_shard_set(path: str | Path) -> bool:
    """A folder written by ``dcal embed --output FOLDER`` (it holds ``shards.json``)."""
    return (Path(path) / SHARDS_MANIFEST).is_file()


def files_digest(files: Sequence[str | Path]) -> str:
    """sha256 of the file list (in order, as bytes): a resumed run must embed the very same list."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.fsencode(str(f)) + b"\0")
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any]:
    from dcal.checkpoint import read_versioned_json

    return read_versioned_json(folder / SHARDS_MANIFEST, SHARDS_FORMAT, SHARDS_VERSION,
                               "feature shard set written by 'dcal embed'")


@dataclass
class ShardSet:
    """A complete shard set: ``len()`` kept features, :meth:`chunks` reads them one shard at a time."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> ShardSet:
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if not manifest.get("complete"):
            done = sum((folder / shard_name(i)).is_file() for i in range(int(manifest["num_shards"])))
            raise ValueError(f"{folder}: unfinished embedding ({done} of {manifest['num_shards']} shards): run the "
                             "same 'dcal embed' command again to finish it")
        return cls(folder, manifest)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest["meta"])

    def chunks(self) -> Iterator[Any]:
        """The shards as :class:`dcal.retrieval.FeatureSet` (features in the stored dtype), in order."""
        from dcal.retrieval import FeatureSet

        for i in range(int(self.manifest["num_shards"])):
            path = self.folder / shard_name(i)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: a shard of this complete set is missing (the folder was changed "
                                        "after 'dcal embed'); embed again into a new folder")
            yield FeatureSet.load(path)

    def failed(self) -> dict[str, str]:
        """{path: reason} of the unreadable images of every shard (read from the shards' headers)."""
        out: dict[str, str] = {}
        for i in range(int(self.manifest["num_shards"])):
            out.update(_shard_header(self.folder / shard_name(i))["failed"])
        return out


def _shard_header(path: Path) -> dict[str, Any]:
    """A shard's rows, dimension and failed files, without reading its features."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        rows, dim = f.get_slice("features").get_shape()
    return {"rows": int(rows), "dim": int(dim), "failed": json.loads(meta.get("failed", "{}"))}


@dataclass
class ShardPlan:
    """What ``dcal embed --output FOLDER`` embeds: the sorted file list, the resolved settings, the manifest."""

    folder: Path
    files: list[Path]
    options: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    def shard_files(self, i: int) -> list[Path]:
        size = int(self.manifest["shard_size"])
        return self.files[i * size:(i + 1) * size]


def plan_shards(loaded: Any, paths: Sequence[str | Path], folder: str | Path, *,
                shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float16", **embed_options: Any) -> ShardPlan:
    """The shard set of the images of ``paths`` (files and folders, recursive) embedded by ``loaded`` with
    ``embed_options`` (:func:`dcal.retrieval.embedding_options`); nothing is written."""
    from dcal.inference import list_images
    from dcal.retrieval import embedding_meta, embedding_options
    from dcal.vocabulary import FEATURE_DTYPES

    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {FEATURE_DTYPES}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    options = embedding_options(loaded, **embed_options)
    files = list_images(paths)
    if not files:
        raise FileNotFoundError(f"no image found in {', '.join(map(str, paths))}")
    manifest = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "complete": False, "files": len(files),
                "files_sha256": files_digest(files), "shard_size": shard_size,
                "num_shards": -(-len(files) // shard_size), "dtype": dtype,
                "meta": embedding_meta(loaded, options, None)}
    return ShardPlan(Path(folder), files, options, manifest)


def start_shards(plan: ShardPlan) -> bool:
    """Write the plan's manifest into a new or empty folder, or check that the folder's shard set is this plan's
    (then it is resumed). One process does this before any embeds. Returns True when resuming."""
    from dcal.checkpoint import atomic_write_text

    folder = plan.folder
    if is_shard_set(folder):
        _check_resumable(folder, _read_manifest(folder), plan.manifest)
        return True
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"--output {folder}: the folder holds other files; embed into a new or empty one")
    atomic_write_text(folder / SHARDS_MANIFEST, json.dumps(plan.manifest, indent=1))
    return False


def embed_shards(loaded: Any, plan: ShardPlan, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0) -> dict[str, Any]:
    """Embed the shards of process ``rank`` of ``world_size`` (``rank, rank + world_size, ...``) that are not on
    disk yet, one bar over them with images/s. Returns ``{"embedded": images read now, "skipped": {path: reason}
    of those, "shards": shards written now, "seconds": ...}``; :func:`finish_shards` completes the set once every
    process is done."""
    import torch
    from tqdm import tqdm

    from dcal.retrieval import FeatureSet, identities

    folder, dtype = plan.folder, plan.manifest["dtype"]
    mine = [i for i in range(rank, plan.num_shards, world_size) if not (folder / shard_name(i)).is_file()]
    todo = sum(len(plan.shard_files(i)) for i in mine)
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    bar = tqdm(total=todo, desc=f"embed (rank {rank})" if world_size > 1 else "embed", unit="img",
               dynamic_ncols=True, disable=not sys.stderr.isatty())
    with bar:
        for i in mine:
            feats, kept, failed = _embed_part(loaded, plan.shard_files(i), plan.options, workers, bar)
            skipped.update(failed)
            for path, reason in failed.items():
                logger.warning("skipped %s: %s", path, reason)
            if feats is None:  # every image of the shard unreadable: an empty shard keeps the numbering
                feats = torch.zeros(0, 0)
            pids, camids = identities(kept)
            meta = {**plan.manifest["meta"], "dim": int(feats.shape[1]) or None, "shard": i}
            _save_shard(FeatureSet(feats.to(getattr(torch, dtype)), kept, pids, camids, meta, failed),
                        folder / shard_name(i))
    return {"embedded": todo, "skipped": skipped, "shards": len(mine), "seconds": time.perf_counter() - start}


def _embed_part(loaded: Any, files: Sequence[Path], options: dict[str, Any], workers: int,
                bar: Any) -> tuple[Any, list[str], dict[str, str]]:
    from dcal.retrieval import embed_files

    return embed_files(loaded, files, options, workers, progress=bar)


def _save_shard(features: Any, path: Path) -> None:
    features.save(path)  # atomic: a shard on disk is whole


def _check_resumable(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    flat_old = {**old, **old.get("meta", {})}
    flat_new = {**new, **new["meta"]}
    for key in _RESUME_KEYS:
        if flat_old.get(key) != flat_new.get(key):
            what = ("the images to embed changed since it started" if key in ("files", "files_sha256")
                    else f"{key} differs: {flat_old.get(key)!r} there, {flat_new.get(key)!r} now")
            raise ValueError(f"--output {folder}: holds an embedding that this command cannot continue ({what}); "
                             "embed into another folder (or add new images to an index with 'dcal index add')")


def finish_shards(folder: str | Path) -> ShardSet:
    """Mark the shard set complete once every shard exists: the manifest gets ``complete``, ``count`` (features
    kept), ``failed`` (images skipped) and ``dim``. Idempotent."""
    from dcal.checkpoint import atomic_write_text

    folder = Path(folder)
    manifest = _read_manifest(folder)
    missing = [i for i in range(manifest["num_shards"]) if not (folder / shard_name(i)).is_file()]
    if missing:
        raise ValueError(f"{folder}: shards {missing[:5]} are missing: run the same 'dcal embed' command again")
    if not manifest.get("complete"):
        headers = [_shard_header(folder / shard_name(i)) for i in range(manifest["num_shards"])]
        count = sum(h["rows"] for h in headers)
        if count == 0:
            raise ValueError(f"none of the {manifest['files']} images could be read")
        dims = {h["dim"] for h in headers if h["rows"]}
        if len(dims) != 1:
            raise ValueError(f"{folder}: shards of different feature dimensions {sorted(dims)}")
        manifest.update(complete=True, count=count, failed=sum(len(h["failed"]) for h in headers))
        manifest["meta"]["dim"] = dims.pop()
        atomic_write_text(folder / SHARDS_MANIFEST, json.dumps(manifest, indent=1))
    return ShardSet(folder, manifest)

