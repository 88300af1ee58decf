"""dcal predict / dcal.predict: top-k classes of files and folders; unreadable files reported, not fatal."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

import dcal
from dcal.cli import main
from dcal.inference import list_images
from dcal.loading import load_model
from tests.tiny_runs import CLASSES


@pytest.fixture
def inputs(fgvc_run, tmp_path):
    """The 6 test images (in nested class folders), a file that is not an image and a path that does not exist."""
    _, data = fgvc_run
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    return [data / "test", bad, tmp_path / "missing.jpg"]


@torch.no_grad()
def _expected(run, paths):
    """Top-1 class and probability, straight from the model on the run's test transform."""
    loaded = load_model(run=run, device="cpu")
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(loaded.transform(im.convert("RGB")))
    probs = loaded.model.predict(torch.stack(images)) / 2  # mean of softmax(SA) and softmax(GLCA)
    return probs


def test_predict_cli_csv_and_json(fgvc_run, inputs, tmp_path, capsys):
    run, data = fgvc_run
    out_csv = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run), *map(str, inputs), "--topk", "2", "--output", str(out_csv),
                 "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    images = list_images([data / "test"])
    assert len(images) == 6 and [r["path"] for r in rows] == [str(p) for p in images] + [str(p) for p in inputs[1:]]
    ok, failed = rows[:6], rows[6:]
    assert all(r["error"] == "" for r in ok)
    assert "UnidentifiedImageError" in failed[0]["error"] and "broken.png" in printed
    assert "No such file" in failed[1]["error"] and failed[1]["class_1"] == ""
    probs = _expected(run, images)
    top = probs.topk(2, dim=-1)
    for r, p, i in zip(ok, top.values, top.indices, strict=True):
        assert [r["class_1"], r["class_2"]] == [CLASSES[int(i[0])], CLASSES[int(i[1])]]
        assert float(r["prob_1"]) == pytest.approx(float(p[0]), abs=1e-5)
        assert float(r["prob_1"]) >= float(r["prob_2"])
    assert CLASSES[int(top.indices[0, 0])] in printed  # the terminal table names the classes

    out_json = tmp_path / "preds.json"
    assert main(["predict", "--run", str(run), *map(str, inputs), "--topk", "3", "--output", str(out_json)]) == 0
    records = json.loads(out_json.read_text())
    assert len(records) == 8 and records[7]["error"] and records[7]["classes"] == []
    assert sum(records[0]["probabilities"]) == pytest.approx(1.0, abs=1e-5)  # all 3 classes: a distribution
    assert sorted(records[0]["classes"]) == sorted(CLASSES)


def test_python_api_tensor_paths_and_pil_agree(fgvc_run):
    run, data = fgvc_run
    loaded = dcal.load_model(run=run, device="cpu")
    files = list_images([data / "test"])[:3]
    by_path = dcal.predict(loaded, files, topk=1)
    pil = [Image.open(p) for p in files]
    by_pil = dcal.predict(loaded, pil, topk=1)
    tensor = torch.stack([loaded.transform(im.convert("RGB")) for im in pil])
    by_tensor = dcal.predict(loaded.model, tensor, topk=1, classes=list(CLASSES))
    for a, b, c in zip(by_path, by_pil, by_tensor, strict=True):
        assert a.classes == b.classes == c.classes
        assert a.probabilities[0] == pytest.approx(c.probabilities[0], abs=1e-6)
    assert by_path[0].source == str(files[0]) and by_pil[0].source == "<image 0>"


def test_predict_rejects_reid_models_and_bad_output(reid_run, fgvc_run, tmp_path, capsys):
    run, root = reid_run
    assert main(["predict", "--run", str(run), str(root / "query")]) == 2
    assert "dcal embed" in capsys.readouterr().err
    assert main(["predict", "--run", str(fgvc_run[0]), str(fgvc_run[1] / "test"), "--output", "x.txt"]) == 2
    assert ".csv or .json" in capsys.readouterr().err


def test_the_table_keeps_class_names_that_differ_only_at_their_end():
    from dcal.inference import Prediction, predictions_table

    names = ["139.Scarlet_Tanager_breeding_plumage", "140.Scarlet_Tanager_winter_plumage_female"]
    table = predictions_table([Prediction("a.jpg", [0, 1], names, [0.6, 0.4])])
    assert names[0] in table  # whole when it fits (40 characters)
    assert "140.Scarlet_Tanager_…nter_plumage_female 0.400" in table  # longer: the middle goes, never the end
