"""dcal report: curves PNG and Markdown summary of one run; overlay and config differences of several."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from dcal.cli import main
from dcal.report import read_run, run_summary


def _ink(path):
    """Fraction of non-white pixels: a blank or nearly empty figure has little."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return float((arr < 250).mean())


def test_report_of_one_run(fgvc_run, tmp_path):
    run, _ = fgvc_run
    out = tmp_path / "rep"
    assert main(["report", str(run), "--output-dir", str(out)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if not r.get("final")]
    best = max(epochs, key=lambda r: r["top1"])
    md = (out / "report.md").read_text()
    row, _, values = md.splitlines()[2:5]  # the summary table: header, separator, the run's row
    cells = dict(zip([c.strip() for c in row.strip("|").split("|")], [c.strip() for c in values.strip("|").split("|")],
                     strict=True))
    assert cells["best top1"] == f"{best['top1']:.2f}" and cells["best epoch"] == str(best["epoch"])
    assert cells["last top1_glca"] == f"{epochs[-1]['top1_glca']:.2f}" and cells["epochs"] == "2/2"
    assert cells["train time (min)"] != "-" and cells["finished"] == "True"
    assert "`model.top_r`: 0.10" in md and "![training curves](curves.png)" in md
    assert "## Started from\n\n- deit_tiny_patch16_224 from scratch" in md
    # the mechanism: a folder set has no mark, but the run has PWCA: its last share per block
    share = epochs[-1]["pwca_share"]
    assert "mark hit" not in md and f"per block {100 * share[0]:.1f}, {100 * share[1]:.1f} (%" in md
    with Image.open(out / "curves.png") as im:
        # four panels, the mechanism and PWCA's share per block: 6 x 4.5 x 4.2 inches at 100 dpi
        assert im.size == (2700, 420)
    assert _ink(out / "curves.png") > 0.02


def test_report_mechanism_panel_and_starting_point(fgvc_run, tmp_path):
    """Mark hits of the three selections and the PWCA share are drawn per epoch and listed for the last one; the
    starting point names a pretraining run's dataset."""
    run, _ = fgvc_run
    fake = tmp_path / "run"
    shutil.copytree(run, fake)
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "synthetic_task": "coarse"}}))
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["model"]["pretrained_file"] = str(pre)
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.loads(x) for x in (fake / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "top1" in r:
            r.update(mark_hit_rollout=40.0 + r["epoch"], mark_hit_last_layer=30.0, mark_hit_chance=5.25)
    (fake / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plain = tmp_path / "plain"
    assert main(["report", str(run), "--output-dir", str(plain)]) == 0
    assert main(["report", str(fake), "--output-dir", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "rollout 42.0%, last layer 30.0%, chance 5.2%" in md  # epoch 2's values (40 + epoch)
    assert f"pretrained SA-only by dcal in {pre} (synthetic train, coarse task," in md
    # the mark-hit curves add ink to the mechanism panel (the fifth of six)
    with Image.open(plain / "curves.png") as a, Image.open(tmp_path / "rep" / "curves.png") as b:
        panel = (4 * 450, 0, 5 * 450, 420)
        ink = [float((np.asarray(im.convert("L").crop(panel)) < 250).mean()) for im in (a, b)]
    assert ink[1] > ink[0] + 0.005


def test_report_overlays_runs_and_lists_config_differences(fgvc_run, reid_run, tmp_path):
    run, _ = fgvc_run
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["model"]["top_r"] = 0.3
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "top1" in r:
            r["top1"] = 99.0
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "overlay"
    assert main(["report", str(a), str(b), "--output-dir", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| a/run |" in md and "| b/run |" in md  # equal names: parent folders tell them apart
    assert "## Config differences" in md and "model.top_r" in md and "0.30" in md
    assert "output_dir" not in md.split("## Config differences")[1]
    assert run_summary(read_run(b))["best top1"] == 99.0
    assert _ink(out / "curves.png") > 0.02
    assert main(["report", str(a), str(reid_run[0]), "--output-dir", str(tmp_path / "mixed")]) == 2  # FGVC + Re-ID
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_reid_report_plots_map(reid_run, tmp_path):
    assert main(["report", str(reid_run[0]), "--output-dir", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "best mAP" in md and "last rank1" in md
    summary = run_summary(read_run(reid_run[0]))
    records = [json.loads(x) for x in (reid_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert summary["best mAP"] == pytest.approx(max(r["mAP"] for r in records if not r.get("final")))


def test_run_killed_mid_append_reads_and_damage_elsewhere_is_named(fgvc_run, tmp_path):
    """One metrics reader for report, ablation and resume: a cut last line (a kill mid-append) is dropped; a bad
    line anywhere else, or a line that is not an object, is an error naming the file and line."""
    from dcal.engine import read_metrics

    run, _ = fgvc_run
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    metrics = cut / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "lo')
    assert read_metrics(metrics) == [json.loads(x) for x in good.splitlines()]
    assert len(read_run(cut).epochs) == len(read_run(run).epochs)
    lines = good.splitlines()
    metrics.write_text("\n".join([lines[0], '{"epoch": 0, "lo', *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_run(cut)
    metrics.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_metrics(metrics)


def test_epochs_are_numbered_from_1(fgvc_run):
    run, _ = fgvc_run
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 2]  # two epochs and the final record, as the console counts
    final = records[-1]
    assert final["final"] and 1 <= final["best_epoch"] <= 2
