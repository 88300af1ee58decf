"""dcal.gallery.index: exact filtered search against a brute-force reference (with many exact ties), add / remove
equal to a fresh build, atomic writes under a failure mid-write and a kill, the writer lock, bad index folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from dcal.cli import main  # noqa: E402
from dcal.gallery import index as gi  # noqa: E402
from dcal.gallery.index import FeatureSource, GalleryIndex, IndexError_, build_index  # noqa: E402
from dcal.retrieval import FeatureSet, parse_identity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
META = {"checkpoint_sha256": "abc", "fusion": "sa+glca", "after_bn": False, "flip": False, "dim": 32}


def tied_vectors(rng: np.random.Generator, n: int, d: int = 32, pool: int | None = None) -> np.ndarray:
    """Rows with 16 entries of +-1 (0.25 after normalisation): every distance is exact in float32 (squared
    distances are multiples of 1/16), so faiss and numpy agree bit for bit and ties are many and exact; ``pool``
    draws the rows from that many distinct ones (duplicates: ties at distance 0 too)."""
    base = np.zeros((pool or n, d), dtype=np.float32)
    for i in range(len(base)):
        base[i, rng.choice(d, 16, replace=False)] = rng.choice([-1.0, 1.0], 16)
    return base if pool is None else base[rng.integers(0, pool, n)]


def market_names(rng: np.random.Generator, n: int, ids: int = 12) -> list[str]:
    pids = rng.integers(-1, ids, n)
    return [f"g/{p:04d}_c{c}s1_{f:06d}_{i:04d}.jpg" if p >= 0 else f"g/-1_c{c}s1_{f:06d}_{i:04d}.jpg"
            for i, (p, c, f) in enumerate(zip(pids, rng.integers(1, 5, n), rng.integers(0, 1000, n), strict=True))]


def features(x: np.ndarray, paths: list[str], meta: dict | None = None) -> FeatureSet:
    ids = [parse_identity(p) for p in paths]
    if None in ids:
        return FeatureSet(torch.tensor(x), paths, None, None, dict(meta or META))
    return FeatureSet(torch.tensor(x), paths, [i[0] for i in ids], [i[1] for i in ids], dict(meta or META))


def source(fs: FeatureSet, name: str = "features") -> FeatureSource:
    return FeatureSource(name, len(fs), fs.meta, lambda: iter([fs]))


def reference(q: np.ndarray, g: np.ndarray, k: int, qp=None, qc=None, gp=None, gc=None, allowed=None):
    """Brute force: squared distances on unit rows, excluded items at inf, a stable sort (ties by gallery index)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    d = ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
    bad = np.zeros(d.shape, dtype=bool)
    if qp is not None:
        bad |= ((gp[None] == qp[:, None]) & (gc[None] == qc[:, None])) | (gp[None] == -1)
    if allowed is not None:
        bad |= ~allowed[None]
    d = np.where(bad, np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d, order, 1)
    return np.where(np.isinf(dk), -1, order), np.sqrt(dk)


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(0)
    g = tied_vectors(rng, 600, pool=150)
    names = market_names(rng, 600)
    return tmp_path, g, names, rng


@pytest.mark.parametrize("k", [1, 7, 40])
def test_flat_search_equals_brute_force_with_ties_protocol_and_filters(gallery, k):
    tmp, g, names, rng = gallery
    index = build_index(tmp / "idx", [source(features(g, names))], "flat")
    q = tied_vectors(rng, 30, pool=40)
    qp, qc = rng.integers(0, 12, 30), rng.integers(0, 4, 30)
    gp = np.array([parse_identity(p)[0] for p in names])
    gc = np.array([parse_identity(p)[1] for p in names])
    frame = np.array([int(Path(p).name.split("_")[2]) for p in names])
    cases = [({}, {}),
             ({"query_pids": qp, "query_camids": qc}, {"qp": qp, "qc": qc, "gp": gp, "gc": gc}),
             ({"query_pids": qp, "query_camids": qc, "cameras": [1, 3], "frames": (100, 600)},
              {"qp": qp, "qc": qc, "gp": gp, "gc": gc,
               "allowed": np.isin(gc, [1, 3]) & (frame >= 100) & (frame <= 600)})]
    for ours, theirs in cases:
        res = GalleryIndex.open(tmp / "idx").search(q, k, **ours)
        want_rows, want_d = reference(q, g, k, **theirs)
        np.testing.assert_array_equal(res.rows, want_rows)
        np.testing.assert_allclose(res.distance, want_d, rtol=0, atol=1e-6)
    assert len(index) == 600


def test_exact_ties_at_the_cut_are_fetched_before_ordering(tmp_path):
    """All 50 items at one distance: the top-3 are the first three by position, whatever faiss returns first."""
    x = np.tile(tied_vectors(np.random.default_rng(1), 1), (50, 1))
    names = [f"g/{i:04d}_c1s1_000001_00.jpg" for i in range(50)]
    index = build_index(tmp_path / "idx", [source(features(x, names))], "flat")
    res = index.search(x[:1], 3)
    assert res.rows.tolist() == [[0, 1, 2]] and len(res.stats["fetch_sizes"]) > 1


def test_ivf_with_every_list_probed_equals_flat_and_hnsw_recall_is_measured(gallery):
    tmp, g, names, rng = gallery
    # ties between lists: faiss meets them in the order it scans the lists; dcal orders them by position
    tied = build_index(tmp / "tied", [source(features(g, names))], "IVF8,Flat")
    q = tied_vectors(rng, 20, pool=40)
    res = GalleryIndex.open(tmp / "tied", search_params={"nprobe": 8}).search(q, 25)
    np.testing.assert_array_equal(res.rows, reference(q, g, 25)[0])
    assert len(tied) == 600
    g = g + 0.01 * rng.standard_normal(g.shape).astype(np.float32)  # no ties: approximate indexes order them freely
    fs = features(g, names)
    flat = build_index(tmp / "flat", [source(fs)], "flat")
    ivf = build_index(tmp / "ivf", [source(fs)], "ivf")
    lists = ivf.info()["ivf_lists"]
    assert ivf.manifest["index"] == f"IVF{lists},Flat" and 39 <= 600 / lists <= 256
    q = g[:25] + 0.05 * rng.standard_normal((25, 32)).astype(np.float32)
    exact = flat.search(q, 10)
    full = GalleryIndex.open(tmp / "ivf", search_params={"nprobe": lists}).search(q, 10)
    np.testing.assert_array_equal(full.rows, exact.rows)
    hnsw = build_index(tmp / "hnsw", [source(fs)], "hnsw").search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.rows, exact.rows, strict=True)])
    assert recall >= 0.9


def test_true_neighbours_kept_while_adding_equal_brute_force():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((5000, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    truth = gi.TrueNeighbours(g[rng.choice(5000, 40, replace=False)])
    labels = rng.permutation(10**6)[:5000]  # labels need not be positions
    for a in range(0, 5000, 1700):  # pieces of uneven size, across the 16k sub-blocks
        truth.observe(g[a : a + 1700], labels[a : a + 1700])
    d = ((truth.queries[:, None, :] - g[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(truth.labels.numpy(), labels[np.argsort(d, axis=1, kind="stable")[:, :11]])
    # recall leaves the query itself out: the exact labels score 1, only the query itself scores 0
    assert truth.recall(truth.labels.numpy()) == 1.0
    assert truth.recall(np.concatenate([truth.labels.numpy()[:, :1], -np.ones((40, 10), np.int64)], 1)) == 0.0


def _loo_recall(folder: Path, g: np.ndarray, picks: np.ndarray, key: str, value: int) -> float:
    """Recall@10 of the index at ``key=value`` for gallery vectors ``picks`` against brute force, self left out."""
    idx = GalleryIndex.open(folder, search_params={key: value})
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    q = gn[picks]
    exact = np.argsort(((q[:, None] - gn[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :11]
    got = idx.search(q, 11).rows
    return float(np.mean([(len(set(a) & set(b)) - 1) / 10 for a, b in zip(exact, got, strict=True)]))


@pytest.mark.parametrize(("kind", "key"), [("IVF64,Flat", "nprobe"), ("HNSW4", "efSearch")])
def test_the_default_search_parameter_is_the_smallest_reaching_the_recall_target(tmp_path, kind, key, monkeypatch):
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((50, 24)).astype(np.float32)
    g = centres[rng.integers(0, 50, 6000)] + 0.6 * rng.standard_normal((6000, 24)).astype(np.float32)
    monkeypatch.setattr(gi, "CALIBRATION_QUERIES", 300)
    index = build_index(tmp_path / "i", [source(features(g, [f"g/{i}.jpg" for i in range(6000)], {**META, "dim": 24}))],
                        kind)
    cal = index.manifest["calibration"]
    assert cal["param"] == key and index.manifest["search"][key] == cal["value"] and cal["queries"] == 300
    assert f"{key} {cal['value']}" in index.info()["calibrated"]
    tried = [int(v) for v in cal["tried"]]
    assert tried[-1] == cal["value"] and cal["recall"] >= gi.CALIBRATION_RECALL and cal["at_k"] == 10
    assert all(r < gi.CALIBRATION_RECALL for r in list(cal["tried"].values())[:-1])
    assert len(tried) > 1  # the data make the first value too small: the test sees a choice
    # the recall the build measured is the recall of the calibration queries: the same gallery vectors, drawn again
    picks = np.sort(np.random.default_rng(1).choice(6000, 300, replace=False))
    assert _loo_recall(tmp_path / "i", g, picks, key, cal["value"]) == pytest.approx(cal["recall"], abs=1e-4)
    assert _loo_recall(tmp_path / "i", g, picks, key, tried[-2]) < gi.CALIBRATION_RECALL
    # exact search has nothing to calibrate
    flat = build_index(tmp_path / "f", [source(features(g, [f"g/{i}.jpg" for i in range(6000)],
                                                        {**META, "dim": 24}))], "flat")
    assert "calibration" not in flat.manifest and "calibrated" not in flat.info()


def test_calibrating_with_the_users_queries_measures_their_recall(tmp_path, capsys):
    rng = np.random.default_rng(6)
    meta = {**META, "dim": 24}
    centres = rng.standard_normal((60, 24)).astype(np.float32)
    g = centres[rng.integers(0, 60, 6000)] + 0.6 * rng.standard_normal((6000, 24)).astype(np.float32)
    q = rng.standard_normal((300, 24)).astype(np.float32)  # queries unlike the gallery: nothing is near them
    features(g, [f"g/{i}.jpg" for i in range(6000)], meta).save(tmp_path / "g.safetensors")
    features(q, [f"q/{i}.jpg" for i in range(300)], meta).save(tmp_path / "q.safetensors")
    assert main(["index", "build", str(tmp_path / "i"), str(tmp_path / "g.safetensors"), "--type", "IVF64,Flat",
                 "--calibrate-with", str(tmp_path / "q.safetensors")]) == 0
    cal = GalleryIndex.open(tmp_path / "i").manifest["calibration"]
    printed = capsys.readouterr().out
    assert f"search default nprobe {cal['value']}: recall@10 {cal['recall']} on 300 queries of" in printed
    assert cal["at_k"] == 10 and cal["queries"] == 300 and cal["recall"] >= gi.CALIBRATION_RECALL

    def held_out_recall(nprobe: int) -> float:  # brute force, nothing left out
        gn, qn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (g, q))
        exact = np.argsort(((qn[:, None] - gn[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :10]
        got = GalleryIndex.open(tmp_path / "i", search_params={"nprobe": nprobe}).search(q, 10).rows
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)]))

    tried = [int(v) for v in cal["tried"]]
    assert held_out_recall(cal["value"]) == pytest.approx(cal["recall"], abs=1e-4) and len(tried) > 1
    assert held_out_recall(tried[-2]) < gi.CALIBRATION_RECALL
    # the gallery's own vectors ask for less: queries unlike the gallery are the harder case
    own = build_index(tmp_path / "own", [source(features(g, [f"g/{i}.jpg" for i in range(6000)], meta))], "IVF64,Flat")
    assert own.manifest["calibration"]["value"] < cal["value"]
    with pytest.raises(ValueError, match="no features to calibrate"):
        build_index(tmp_path / "e", [source(features(g, [f"g/{i}.jpg" for i in range(6000)], meta))], "IVF64,Flat",
                    calibration=source(features(q[:0], [], meta)))


def test_a_calibration_that_cannot_reach_the_target_takes_the_smallest_value_near_the_best():
    from dcal.gallery.backends import FaissBackend

    rng = np.random.default_rng(4)
    g = rng.standard_normal((3000, 24)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    be = FaissBackend.create("HNSW2", 24)  # two links per node: recall stays far below 0.99 at any efSearch
    truth = gi.TrueNeighbours(g[:200])
    be.add(g, np.arange(3000))
    truth.observe(g, np.arange(3000))
    cal = gi.calibrate(be, truth)
    recalls = {int(v): r for v, r in cal["tried"].items()}
    assert list(recalls) == [16, 32, 64, 128, 256, 512] and max(recalls.values()) < gi.CALIBRATION_RECALL
    assert cal["value"] == min(v for v, r in recalls.items() if r >= max(recalls.values()) - 0.005)
    assert be.search_params["efSearch"] == cal["value"]


def test_add_equals_one_build_skips_held_paths_and_refuses_another_model(gallery):
    tmp, g, names, _ = gallery
    build_index(tmp / "both", [source(features(g, names))], "flat")
    build_index(tmp / "grown", [source(features(g[:400], names[:400]))], "flat")
    index, added, skipped = gi.add_to_index(tmp / "grown", [source(features(g[300:], names[300:]))])
    assert (added, skipped) == (200, 100) and len(index) == 600
    q = g[::37]
    a, b = GalleryIndex.open(tmp / "both").search(q, 20), GalleryIndex.open(tmp / "grown").search(q, 20)
    np.testing.assert_array_equal(a.rows, b.rows)
    other = features(g[:5], [f"new/{i}.jpg" for i in range(5)], {**META, "checkpoint_sha256": "other"})
    with pytest.raises(IndexError_, match="features of another model or feature kind"):
        gi.add_to_index(tmp / "grown", [source(other)])
    wide = features(np.ones((2, 16), np.float32), ["w/a.jpg", "w/b.jpg"], {**META, "dim": 16})
    with pytest.raises(IndexError_, match="dimension 16 but index .* holds dimension 32"):
        gi.add_to_index(tmp / "grown", [source(wide)])
    assert len(GalleryIndex.open(tmp / "grown")) == 600


def test_remove_equals_a_build_without_them_and_hnsw_refuses(gallery):
    tmp, g, names, _ = gallery
    pids = np.array([parse_identity(p)[0] for p in names])
    keep = ~np.isin(pids, [3, 5])
    keep[7] = False
    build_index(tmp / "idx", [source(features(g, names))], "flat")
    index, n = gi.remove_from_index(tmp / "idx", paths=[names[7]], pids=[3, 5])
    assert n == int((~keep).sum()) and len(index) == keep.sum()
    kept = [p for p, k in zip(names, keep, strict=True) if k]
    build_index(tmp / "ref", [source(features(g[keep], kept))], "flat")
    q = g[::29]
    a, b = GalleryIndex.open(tmp / "idx"), GalleryIndex.open(tmp / "ref")
    ra, rb = a.search(q, 15), b.search(q, 15)
    assert [a.idmap.paths(r) for r in ra.rows] == [b.idmap.paths(r) for r in rb.rows]
    build_index(tmp / "hnsw", [source(features(g, names))], "hnsw")
    before = json.loads((tmp / "hnsw" / "manifest.json").read_text())
    with pytest.raises(IndexError_, match="cannot remove vectors"):
        gi.remove_from_index(tmp / "hnsw", pids=[3])
    assert json.loads((tmp / "hnsw" / "manifest.json").read_text()) == before


def _snapshot(folder: Path) -> tuple[dict, list[list[int]]]:
    index = GalleryIndex.open(folder)
    return index.manifest, index.search(np.eye(32, dtype=np.float32)[:4] + 0.1, 10).rows.tolist()


@pytest.mark.parametrize("where", ["manifest", "index file"])
def test_an_add_failing_mid_write_leaves_the_index_as_it_was(gallery, monkeypatch, where):
    tmp, g, names, _ = gallery
    folder = tmp / "idx"
    build_index(folder, [source(features(g[:300], names[:300]))], "ivf")
    before = _snapshot(folder)

    def fail(*args):
        if where == "index file":  # half a file written, then the disk fills up
            Path(args[-1]).write_bytes(b"IwFl" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    if where == "manifest":
        monkeypatch.setattr(gi, "_write_manifest", fail)
    else:
        monkeypatch.setattr(gi.FaissBackend, "write", lambda self, path: fail(path))
    with pytest.raises(OSError):
        gi.add_to_index(folder, [source(features(g[300:], names[300:]))])
    monkeypatch.undo()
    assert _snapshot(folder) == before
    index, added, _ = gi.add_to_index(folder, [source(features(g[300:], names[300:]))])
    assert added == 300 and sorted(p.name for p in folder.iterdir()) == [
        "ids-000002.npz", "index-000002.faiss", "manifest.json"]  # the failed write's leftovers are gone


def test_a_killed_add_leaves_the_index_as_it_was_and_its_lock_is_taken_over(gallery):
    tmp, g, names, _ = gallery
    folder = tmp / "idx"
    build_index(folder, [source(features(g[:300], names[:300]))], "flat")
    features(g[300:], names[300:]).save(tmp / "more.safetensors")
    before = _snapshot(folder)
    code = ("import os, sys; from dcal.gallery import index as gi\n"
            "gi._write_manifest = lambda *a: os._exit(9)\n"  # killed right before the commit
            f"sys.exit(__import__('dcal.cli').cli.main(['index', 'add', {str(folder)!r}, "
            f"{str(tmp / 'more.safetensors')!r}]))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 9, res.stderr
    assert any(p.name.startswith(".tmp-") or p.name == "index-000002.faiss" for p in folder.iterdir())
    assert _snapshot(folder) == before
    assert main(["index", "add", str(folder), str(tmp / "more.safetensors")]) == 0
    assert len(GalleryIndex.open(folder)) == 600


def test_a_second_writer_is_refused_in_one_line(gallery, capsys):
    tmp, g, names, _ = gallery
    folder = tmp / "idx"
    build_index(folder, [source(features(g[:300], names[:300]))], "flat")
    features(g[300:], names[300:]).save(tmp / "more.safetensors")
    with gi._lock(folder):
        assert main(["index", "add", str(folder), str(tmp / "more.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use by another dcal index writer" in err
    assert len(GalleryIndex.open(folder)) == 300


def _one_line_error(capsys, argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for e in expected:
        assert e in err, err


def test_bad_index_folders_are_one_line_each_and_nothing_is_lost(gallery, capsys):
    tmp, g, names, _ = gallery
    build_index(tmp / "idx", [source(features(g, names))], "flat")
    build_index(tmp / "small", [source(features(g[:10], names[:10]))], "flat")
    features(g[:3], names[:3]).save(tmp / "q.safetensors")
    search = ["index", "search", "--query", str(tmp / "q.safetensors"), "--num-vis", "0", "--output-dir",
              str(tmp / "out")]
    manifest = json.loads((tmp / "idx" / "manifest.json").read_text())
    index_file = tmp / "idx" / manifest["files"]["index"]["name"]
    ids_file = tmp / "idx" / manifest["files"]["ids"]["name"]
    good = index_file.read_bytes()

    index_file.write_bytes(good[: len(good) // 2])  # truncated
    _one_line_error(capsys, [*search[:2], str(tmp / "idx"), *search[2:]], "bytes where the manifest says")
    index_file.write_bytes(b"PK\x03\x04" + good[4:])  # foreign: another header
    _one_line_error(capsys, [*search[:2], str(tmp / "idx"), *search[2:]], "not the faiss header")
    index_file.write_bytes(good[:4] + b"\xff" * (len(good) - 4))  # the right header, garbage after it
    _one_line_error(capsys, [*search[:2], str(tmp / "idx"), *search[2:]], "faiss cannot read it")
    index_file.write_bytes(good)

    small = json.loads((tmp / "small" / "manifest.json").read_text())
    saved = ids_file.read_bytes()
    ids_file.write_bytes((tmp / "small" / small["files"]["ids"]["name"]).read_bytes())  # another index's id map
    _one_line_error(capsys, ["index", "info", str(tmp / "idx")], "has 10 rows, the manifest's index 600")
    ids_file.write_bytes(saved)

    newer = {**manifest, "format_version": gi.FORMAT_VERSION + 1, "dcal_version": "9.0"}
    (tmp / "idx" / "manifest.json").write_text(json.dumps(newer))
    _one_line_error(capsys, ["index", "info", str(tmp / "idx")], "written by dcal 9.0", "upgrade dcal")
    (tmp / "idx" / "manifest.json").write_text(json.dumps({**manifest, "files": {
        **manifest["files"], "ids": {"name": "../../etc/passwd"}}}))
    _one_line_error(capsys, ["index", "info", str(tmp / "idx")], "is not one dcal writes")
    (tmp / "idx" / "manifest.json").write_text(json.dumps(manifest))

    features(np.ones((2, 16), np.float32), names[:2], {**META, "dim": 16}).save(tmp / "q16.safetensors")
    _one_line_error(capsys, ["index", "search", str(tmp / "idx"), "--query", str(tmp / "q16.safetensors")],
                    "dimension 16 but index")
    _one_line_error(capsys, ["index", "info", str(tmp)], "not a gallery index")
    assert main(["index", "search", str(tmp / "idx"), *search[2:]]) == 0  # everything still there
    capsys.readouterr()
    assert len(GalleryIndex.open(tmp / "idx")) == 600


def test_index_types_by_name_and_factory_strings(gallery):
    tmp, g, names, _ = gallery
    from dcal.gallery.backends import factory_string, ivf_lists

    assert factory_string("auto", 2_000_000, 384) == "Flat"
    assert factory_string("auto", 2_000_001, 384).startswith("IVF")
    for n in (1000, 100_000, 1_000_000, 100_000_000):
        assert 39 <= n / ivf_lists(n) <= 256
    assert factory_string("ivf-pq", 10**6, 768) == "IVF4000,PQ96x8,Refine(Flat)"
    index = build_index(tmp / "sq", [source(features(g, names))], "IVF4,SQ8")
    assert index.manifest["index"] == "IVF4,SQ8" and len(GalleryIndex.open(tmp / "sq")) == 600
    with pytest.raises(ValueError, match="not an index faiss can build"):
        build_index(tmp / "bad", [source(features(g, names))], "NoSuchIndex")


def test_milvus_backend_gives_the_faiss_results(gallery):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    tmp, g, names, rng = gallery
    g = g + 0.01 * rng.standard_normal(g.shape).astype(np.float32)  # Milvus orders exact ties its own way
    fs = features(g, names)
    flat = build_index(tmp / "faiss", [source(fs)], "flat")
    milvus = build_index(tmp / "milvus", [source(fs)], backend="milvus")
    q = g[::20] + 0.05 * rng.standard_normal((30, 32)).astype(np.float32)
    qp, qc = rng.integers(0, 12, 30), rng.integers(0, 4, 30)
    a = flat.search(q, 10, query_pids=qp, query_camids=qc)
    b = milvus.search(q, 10, query_pids=qp, query_camids=qc)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.distance, b.distance, atol=1e-4)
    gi.remove_from_index(tmp / "milvus", pids=[3])
    gi.remove_from_index(tmp / "faiss", pids=[3])
    a, b = GalleryIndex.open(tmp / "faiss").search(q, 10), GalleryIndex.open(tmp / "milvus").search(q, 10)
    np.testing.assert_array_equal(a.rows, b.rows)


def test_index_benchmark_runs_at_a_tiny_size(tmp_path):
    from tests.helpers import load_script

    bench = load_script("bench_index")
    out = bench.main(["--sizes", "3000", "--dims", "32", "--queries", "20", "--threads", "1", "--sweep",
                      "--json", str(tmp_path / "b.json"), "--work", str(tmp_path / "w")])
    records = {r["type"]: r for r in out["records"]}
    assert set(records) == set(bench.TYPES)
    assert all(0 < r[q][f"recall@{k}"] <= 1 for r in records.values() for q in bench.QUERY_KINDS for k in (1, 10, 100))
    assert records["hnsw"]["gallery-like"]["recall@10"] > 0.9 and set(records["ivf"]["queries_per_s"]) == {1}
    ivf = records["ivf"]  # calibrated at build; the sweep reaches every list, where IVF is exact
    assert ivf["calibration"]["value"] == ivf["search"]["nprobe"] and ivf["sweep"][-1]["recall@10 unlike"] == 1.0
    assert [p["nprobe"] for p in ivf["sweep"]][:3] == [1, 2, 4] and records["flat"]["calibration"] is None
    assert records["ivf"]["index"].startswith("IVF") and records["flat"]["file_bytes"] > 3000 * 32 * 4
    memory = out["computed_memory (not measured)"]
    assert memory["flat"]["100M_GB"] == pytest.approx(10 * memory["flat"]["10M_GB"], rel=0.05)
    assert json.loads((tmp_path / "b.json").read_text())["records"]
