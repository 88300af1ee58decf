"""Re-ID retrieval with a trained model: embed folders, rank a gallery for each query, evaluate, draw rankings.

* :func:`embed_images` -> :class:`FeatureSet` (features + an index of file names, pid and camid when the names
  carry them), saved with :meth:`FeatureSet.save` as ``.safetensors`` so that a gallery is embedded once and
  searched many times (``dcal embed``).
* :func:`rank_gallery` – the top-k gallery items of each query by distance, with the protocol's exclusions when
  ids are known (:mod:`dcal.metrics.reid`: gallery items of the query's identity *and* camera, and junk pid -1, are
  left out of the ranking, as in evaluation and in torchreid's ``visualize_ranked_results``); the gallery is
  streamed in blocks (top-k per block, merged), never one query x gallery matrix; optionally re-ranked
  (k-reciprocal, :mod:`dcal.metrics.rerank`) and with a distance threshold that answers "not in the gallery".
* :func:`ranking_csv` and :func:`save_ranking_pictures` (torchreid's visrank: the query, then the top-10, true
  matches framed green and false ones red).

Identities from file names: VeRi (``0002_c002_...``), Market/Duke (``0002_c1s1_...``) give pid and 0-based camera;
otherwise an integer parent folder is the pid (``reid_folder``: ``<pid>/<image>``) and a ``c<digits>`` token in the
name the camera. When any name of a set carries no ids, the set has none, and a search over it ranks without
evaluating.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from dcal.data.images import open_rgb, printable, safe_file_name
from dcal.data.reid import FOLDER_CAMERA_PATTERN, MARKET_PATTERN, VERI_PATTERN
from dcal.inference import csv_text, list_images, run_batches
from dcal.loading import LoadedModel

FEATURE_FORMAT = "dcal-features"


# ------------------------------------------------------------------------------------------- identities
def parse_identity(path: str | Path) -> tuple[int, int] | None:
    """(pid, 0-based camid) from a file name in the VeRi, Market/Duke or ``reid_folder`` convention, else None."""
    path = Path(path)
    for pattern in (VERI_PATTERN, MARKET_PATTERN):  # VeRi first: its c002 would read as camera 0 in Market's
        m = pattern.match(path.name)
        if m is not None:
            return int(m.group(1)), int(m.group(2)) - 1
    cam = FOLDER_CAMERA_PATTERN.search(path.stem)
    if cam is not None and re.fullmatch(r"-?\d+", path.parent.name):
        return int(path.parent.name), int(cam.group(1)) - 1
    return None


# the frame (or time) number that names carry: Market/Duke 0002_c1s1_000451_03 (frame of sequence s1), VeRi
# 0002_c002_00030600_0 (a time stamp), MARS 0001C1T0001F001 (frame of tracklet T0001)
_FRAME_PATTERNS = (re.compile(r"^-?\d+_c\d+s\d+_(\d+)_"), re.compile(r"^\d+_c\d{3}_(\d+)_"),
                   re.compile(r"^-?\d+C\d+T\d+F(\d+)"))


def parse_frame(path: str | Path) -> int | None:
    """The frame / time number of a Market/Duke, VeRi or MARS file name, else None."""
    name = Path(path).name
    for pattern in _FRAME_PATTERNS:
        m = pattern.match(name)
        if m is not None:
            return int(m.group(1))
    return None


# --------------------------------------------------------------------------------------------- features
@dataclass
class FeatureSet:
    """Embeddings of a list of images: ``features`` (N, D) float32, ``paths``, ``pids``/``camids`` (None when the
    names carry no ids), how they were computed (``meta``) and the files that could not be read."""

    features: Tensor
    paths: list[str]
    pids: list[int] | None
    camids: list[int] | None
    meta: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_ids(self) -> bool:
        return self.pids is not None

    def save(self, path: str | Path) -> Path:
        """``.safetensors``: tensor ``features``; metadata ``index`` (paths, pids, camids), ``meta``, ``failed``."""
        from dcal.checkpoint import save_safetensors

        index = {"paths": self.paths, "pids": self.pids, "camids": self.camids}
        metadata = {"format": FEATURE_FORMAT, "index": json.dumps(index), "meta": json.dumps(self.meta),
                    "failed": json.dumps(self.failed)}
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"--output {str(path)!r}: features are written as .safetensors")
        return save_safetensors(path, {"features": self.features.contiguous()}, metadata)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"features file {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FEATURE_FORMAT:
                raise ValueError(f"{str(path)!r} is not a features file written by 'dcal embed'")
            feats = f.get_tensor("features")
        index = json.loads(meta["index"])
        return cls(feats, index["paths"], index["pids"], index["camids"], json.loads(meta["meta"]),
                   json.loads(meta["failed"]))


def file_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file: ties a features file to the weights that computed it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def embedding_options(loaded: LoadedModel, fusion: str | None = None, after_bn: bool | None = None,
                      flip: bool | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """The embedding settings, each defaulting to the run's evaluation setting (``eval.fusion``,
    ``eval.reid_feature``, ``eval.flip``, ``eval.batch_size``)."""
    cfg = loaded.cfg
    return {"fusion": fusion or cfg.eval.fusion,
            "after_bn": (cfg.eval.reid_feature == "after_bn") if after_bn is None else after_bn,
            "flip": bool(cfg.eval.flip) if flip is None else flip,
            "batch_size": batch_size or cfg.eval.batch_size or cfg.train.batch_size}


def embedding_meta(loaded: LoadedModel, options: dict[str, Any], dim: int | None) -> dict[str, Any]:
    """How features were computed (a features file's ``meta``): the weights' digest and the settings that
    :func:`check_compatible` compares."""
    return {"checkpoint": str(loaded.checkpoint), "checkpoint_sha256": file_digest(loaded.checkpoint),
            "fusion": options["fusion"], "after_bn": options["after_bn"], "flip": options["flip"],
            "dim": dim, "img_size": list(loaded.model.backbone.patch_embed.img_size)}


def embed_files(loaded: LoadedModel, files: Sequence[str | Path], options: dict[str, Any], workers: int = 0,
                progress: Any = None) -> tuple[Tensor | None, list[str], dict[str, str]]:
    """Embed ``files`` (a list, not folders) with :func:`embedding_options`: (features of the readable files or
    None, their paths, {path: reason} of the unreadable ones)."""
    model = loaded.model
    device = next(model.parameters()).device

    def embed(images: Tensor) -> Tensor:
        return model.embed(images, options["fusion"], options["after_bn"], options["flip"]).float()

    model.eval()
    feats, done, failed = run_batches(embed, list(files), loaded.transform, device, options["batch_size"], workers,
                                      desc="embed", progress=progress)
    return feats, [str(files[i]) for i in done], {str(files[i]): err for i, err in failed.items()}


def identities(paths: Sequence[str]) -> tuple[list[int] | None, list[int] | None]:
    """(pids, camids) of ``paths`` by :func:`parse_identity`, or (None, None) when any name carries none."""
    ids = [parse_identity(p) for p in paths]
    if not all(i is not None for i in ids):
        return None, None
    return [i[0] for i in ids], [i[1] for i in ids]  # type: ignore[index]


def embed_images(
    loaded: LoadedModel,
    paths: Sequence[str | Path],
    *,
    fusion: str | None = None,
    after_bn: bool | None = None,
    flip: bool | None = None,
    batch_size: int | None = None,
    workers: int = 0,
) -> FeatureSet:
    """Embed every image of ``paths`` (files and folders, recursive) in batches; options default to the run's
    evaluation settings (:func:`embedding_options`)."""
    options = embedding_options(loaded, fusion, after_bn, flip, batch_size)
    files = list_images(paths)
    if not files:
        raise FileNotFoundError(f"no image found in {', '.join(map(str, paths))}")
    feats, kept, failed = embed_files(loaded, files, options, workers)
    if feats is None:
        raise ValueError(f"none of the {len(files)} images could be read (first: {files[0]}: "
                         f"{next(iter(failed.values()))})")
    pids, camids = identities(kept)
    return FeatureSet(feats, kept, pids, camids, embedding_meta(loaded, options, int(feats.shape[1])), failed)


def is_features_file(path: str | Path) -> bool:
    """A ``.safetensors`` features file (``dcal embed``), by name; anything else is a folder or image to embed."""
    return Path(path).suffix == ".safetensors"


def features_of(source: str | Path, loaded: LoadedModel | None, what: str, **embed_options: Any) -> FeatureSet:
    """The features of ``source``: a features file from ``dcal embed`` (``.safetensors``; computed by ``loaded``'s
    checkpoint when a model is given) or the images of a folder, embedded by ``loaded`` with ``embed_options``
    (:func:`embed_images`). ``what`` names the source in errors (``--query``)."""
    if is_features_file(source):
        feats = FeatureSet.load(source)
        if loaded is not None and feats.meta.get("checkpoint_sha256") != file_digest(loaded.checkpoint):
            raise ValueError(f"{what} {source}: features were computed by {feats.meta.get('checkpoint')}, "
                             f"not by {loaded.checkpoint}")
        return feats
    if loaded is None:
        raise ValueError(f"{what} {source}: --run or --checkpoint is needed to embed image folders (or give a "
                         "features file from dcal embed)")
    return embed_images(loaded, [source], **embed_options)


def check_compatible(a: FeatureSet, b: FeatureSet, what: str = "query and gallery features") -> None:
    """Features are comparable only when the same weights and settings computed them."""
    keys = ("checkpoint_sha256", "fusion", "after_bn", "flip", "dim")
    diff = {k: (a.meta.get(k), b.meta.get(k)) for k in keys if a.meta.get(k) != b.meta.get(k)}
    if diff:
        raise ValueError(f"{what} were computed differently: {diff} (re-embed with the same run and options)")


# ---------------------------------------------------------------------------------------------- ranking
@dataclass
class Ranking:
    """``order`` (Q, k): gallery indices of each query's top-k (-1 past the end of a short ranking), ``distance``
    (Q, k), ``match`` (Q, k) bool (all False when ids are unknown), ``metrics`` when ids are known, and with a
    ``threshold`` ``in_gallery`` (Q,) bool: the best match is at most ``threshold`` away."""

    order: np.ndarray
    distance: np.ndarray
    match: np.ndarray
    metrics: dict[str, Any] | None = None
    threshold: float | None = None
    in_gallery: np.ndarray | None = None


def rank_gallery(query: FeatureSet, gallery: FeatureSet, topk: int = 50, metric: str = "euclidean",
                 evaluate: bool = True, rerank: bool = False, rerank_method: str = "graph",
                 chunk_size: int | None = None, threshold: float | None = None) -> Ranking:
    """The ``topk`` nearest gallery items of every query (ties by gallery index), evaluated (mAP, CMC, mINP with
    :func:`dcal.metrics.eval_reid_features`' streaming evaluator) when both sides carry ids; the gallery is read
    in blocks of about ``chunk_size`` distances. ``rerank``: k-reciprocal re-ranking (``rerank_method``:
    ``graph`` or ``dense``, :func:`dcal.metrics.distance_source`). ``threshold``: a query whose best match is
    farther than it is "not in the gallery" (``Ranking.in_gallery``)."""
    from dcal.metrics.reid import NoValidQueryError, distance_source, evaluate_distances, nearest_gallery, reid_scores

    src = distance_source(query.features, gallery.features, metric=metric, rerank=rerank,
                          rerank_method=rerank_method, chunk_size=chunk_size)
    ids = (query.pids, gallery.pids, query.camids, gallery.camids) if query.has_ids and gallery.has_ids else None
    metrics = None
    if ids is not None and evaluate:
        try:
            with warnings.catch_warnings():  # a gallery shorter than 50 shortens the CMC: expected here
                warnings.simplefilter("ignore")
                res = evaluate_distances(src, *ids, max_rank=50, chunk_size=chunk_size)
            # the keys and units (%) of dcal eval and metrics.jsonl, and the whole CMC curve (%)
            metrics = {**reid_scores(res), "cmc": [100.0 * float(c) for c in res["cmc"]]}
        except NoValidQueryError as e:
            metrics = {"error": str(e)}
    order, d = nearest_gallery(src, topk, ids, chunk_size)
    match = np.zeros(order.shape, dtype=bool)
    if ids is not None:
        match = (np.asarray(gallery.pids)[order] == np.asarray(query.pids)[:, None]) & (order >= 0)
    in_gallery = None if threshold is None else d[:, 0] <= threshold
    return Ranking(order, d, match, metrics, threshold, in_gallery)


def ranking_csv(query: FeatureSet, gallery: FeatureSet, ranking: Ranking) -> str:
    """One row per (query, rank): ``query, query_pid, query_camid, rank, gallery, gallery_pid, gallery_camid,
    distance, match, in_gallery`` (ids and match empty when unknown; ``in_gallery`` 1 when the query's best match
    is within the search's threshold, 0 when it is "not in the gallery", empty without a threshold; names
    :func:`printable`, camids 0-based)."""
    rows: list[list[Any]] = [["query", "query_pid", "query_camid", "rank", "gallery", "gallery_pid",
                              "gallery_camid", "distance", "match", "in_gallery"]]
    ids = query.has_ids and gallery.has_ids
    inside = [""] * len(query) if ranking.in_gallery is None else [int(v) for v in ranking.in_gallery]
    for q in range(len(query)):
        qid = [query.pids[q], query.camids[q]] if query.has_ids else ["", ""]
        for r, (g, d) in enumerate(zip(ranking.order[q], ranking.distance[q], strict=True), start=1):
            if g < 0:
                break
            gid = [gallery.pids[g], gallery.camids[g]] if gallery.has_ids else ["", ""]
            rows.append([printable(query.paths[q]), *qid, r, printable(gallery.paths[g]), *gid, f"{d:.6f}",
                         int(ranking.match[q, r - 1]) if ids else "", inside[q]])
    return csv_text(rows)


# --------------------------------------------------------------------------------------------- pictures
GREEN, RED, GREY = (0, 200, 0), (220, 0, 0), (160, 160, 160)


def _cell(path: str, size: tuple[int, int], color: tuple[int, int, int], border: int) -> Image.Image:
    """The image resized to ``size`` (W, H) inside a ``border``-pixel frame of ``color``."""
    tile = open_rgb(path).resize(size, Image.BILINEAR)
    return ImageOps.expand(tile, border=border, fill=color)


def ranking_picture(query_path: str, gallery_paths: Sequence[str], matches: Sequence[bool | None],
                    cell: tuple[int, int] = (64, 128), border: int = 4, gap: int = 6, query_gap: int = 30,
                    labels: Sequence[str] | None = None) -> Image.Image:
    """torchreid's visrank row: the query (black frame), then the ranked gallery images framed green (true
    match), red (false) or grey (unknown ids), each captioned with its rank (or ``labels``)."""
    w, h = cell[0] + 2 * border, cell[1] + 2 * border
    n = len(gallery_paths)
    text_h = 14
    canvas = Image.new("RGB", (w * (n + 1) + gap * max(n - 1, 0) + query_gap, h + text_h), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_cell(query_path, cell, (0, 0, 0), border), (0, text_h))
    draw.text((2, 1), "query", fill=(0, 0, 0))
    for r, (p, m) in enumerate(zip(gallery_paths, matches, strict=True)):
        x = w + query_gap + r * (w + gap)
        canvas.paste(_cell(p, cell, GREY if m is None else GREEN if m else RED, border), (x, text_h))
        draw.text((x + 2, 1), labels[r] if labels else str(r + 1), fill=(0, 0, 0))
    return canvas


def save_ranking_pictures(out_dir: str | Path, query: FeatureSet, gallery: FeatureSet, ranking: Ranking,
                          topk: int = 10, max_queries: int | None = None,
                          cell: tuple[int, int] = (64, 128)) -> list[Path]:
    """One PNG per query (the first ``max_queries``): ``<out_dir>/<index>_<query name>.png`` (the name
    :func:`printable`, shortened with a hash when the file name would pass 255 bytes); the pictures of an earlier
    search into ``out_dir`` are removed first (they would pass for this one's)."""
    out = Path(out_dir)
    clear_ranking_pictures(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = query.has_ids and gallery.has_ids
    saved = []
    for q in range(len(query) if max_queries is None else min(max_queries, len(query))):
        ranks = [g for g in ranking.order[q, :topk] if g >= 0]
        matches = [bool(m) for m in ranking.match[q, : len(ranks)]] if ids else [None] * len(ranks)
        pic = ranking_picture(query.paths[q], [gallery.paths[g] for g in ranks], matches, cell)
        path = out / safe_file_name(f"{q:05d}_{Path(query.paths[q]).stem}", ".png")
        pic.save(path)
        saved.append(path)
    return saved


def clear_ranking_pictures(out_dir: str | Path) -> list[Path]:
    """Delete the ``*.png`` in ``out_dir`` (an earlier search's pictures); returns them."""
    old = sorted(Path(out_dir).glob("*.png"))
    for p in old:
        p.unlink(missing_ok=True)
    return old


def write_search(out_dir: str | Path, query: FeatureSet, gallery: FeatureSet, ranking: Ranking,
                 num_vis: int | None = 100) -> list[Path]:
    """A search's files in ``out_dir``: ``ranking.csv``, ``metrics.json`` (when the ids allow an evaluation) and
    ``visrank/`` with the top-10 of the first ``num_vis`` queries (None: all; 0: none, and an earlier search's
    pictures are removed: they would pass for this one's). Returns the pictures."""
    from dcal.checkpoint import atomic_write_text, json_text

    out = Path(out_dir)
    atomic_write_text(out / "ranking.csv", ranking_csv(query, gallery, ranking))
    if ranking.metrics is not None:
        atomic_write_text(out / "metrics.json", json_text(ranking.metrics))
    if num_vis == 0:
        clear_ranking_pictures(out / "visrank")
        return []
    return save_ranking_pictures(out / "visrank", query, gallery, ranking, topk=10, max_queries=num_vis,
                                 cell=cell_size(query))


def cell_size(features: FeatureSet, height: int = 128) -> tuple[int, int]:
    """Picture cell (W, H) with the aspect ratio of the model input the features came from (persons 1:2, vehicles
    1:1; 1:2 when unknown)."""
    h, w = features.meta.get("img_size") or (2, 1)
    return max(8, round(height * w / h)), height

