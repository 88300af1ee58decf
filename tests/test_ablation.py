"""``dcal ablation``: variants set their own keys, runs are reused and resumed, the table is the runs' numbers."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import yaml
from PIL import Image

from dcal.ablation import difference_se, format_markdown, mean_std, plan, run_ablation
from dcal.cli import main
from tests.helpers import logged

RECIPE = """
data: {dataset: synthetic, root: unused, resize: 36, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25],
       synthetic_num_classes: 3, synthetic_train_per_class: 8, synthetic_test_per_class: 4, synthetic_image_size: 32}
model: {img_size: 32, timm_kwargs: {depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}, pwca_blocks: 2}
train: {epochs: 2, batch_size: 8, workers: 0, eval_every: 1}
"""


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(RECIPE)
    # the user's model.glca_blocks=2 must lose against each variant's own keys
    with logged("dcal.ablation") as lines:
        summary = run_ablation(recipe, ["table3", "selection"], seeds=2, overrides=["model.glca_blocks=2"],
                               output_dir=tmp / "out")
    return recipe, tmp / "out", summary, lines


def test_variants_set_every_key_they_need(ablation):
    _, out, summary, _ = ablation
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == ["SA only", "+GLCA", "+PWCA", "DCAL", "rollout", "random", "last layer", "glca_pool=cls"]
    saved = {}
    for name, row in rows.items():
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        saved[name] = yaml.safe_load(open(f"{row['runs'][0]['run_dir']}/config.yaml"))
    assert saved["SA only"]["model"]["glca_blocks"] == 0 and saved["SA only"]["eval"]["fusion"] == "sa"
    assert saved["SA only"]["model"]["pwca_blocks"] == 0
    assert saved["+GLCA"]["model"]["glca_blocks"] == 1 and saved["+GLCA"]["model"]["pwca_blocks"] == 0
    assert saved["+PWCA"]["eval"]["fusion"] == "sa" and saved["+PWCA"]["model"]["pwca_blocks"] == 2
    assert saved["random"]["model"]["query_selection"] == "random"
    assert saved["glca_pool=cls"]["model"]["glca_pool"] == "cls"
    # the selection set's rollout row *is* table3's DCAL (same config): trained once, 14 runs in all
    assert rows["rollout"]["runs"] == rows["DCAL"]["runs"]
    assert len({r["run_dir"] for row in rows.values() for r in row["runs"]}) == 14


def test_table_is_the_last_epochs_of_the_runs(ablation):
    _, out, summary, lines = ablation
    assert len(lines) == 15 and lines[0].startswith("[1/14] SA only seed 0: top-1")
    for row in summary["rows"]:
        last = []
        for run in row["runs"]:
            records = [json.loads(x) for x in open(f"{run['run_dir']}/metrics.jsonl")]
            assert records[-1]["final"] and records[-2]["epoch"] == 2
            last.append(records[-2]["top1"])
        assert row["last_top1"] == pytest.approx(mean_std(last))
        # Δ is to the first row of the variant's set (table3: SA only; selection: rollout), with its Welch SE
        ref = next(r for r in summary["rows"] if r["variant"] == row["reference"])
        assert row["reference"] == ("SA only" if row in summary["rows"][:4] else "rollout")
        assert row["delta_top1"] == pytest.approx(row["last_top1"][0] - ref["last_top1"][0])
        mine, theirs = [r["last"]["top1"] for r in row["runs"]], [r["last"]["top1"] for r in ref["runs"]]
        se = math.sqrt(statistics.variance(mine) / 2 + statistics.variance(theirs) / 2)
        assert row["delta_se_top1"] == (None if row is ref or se == 0 else pytest.approx(se))
        # the mechanism columns: the last epoch's PWCA share (only where there is PWCA) and mark hit, over seeds
        shares = [json.loads(open(f"{run['run_dir']}/metrics.jsonl").readlines()[-2]).get("pwca_share_mean")
                  for run in row["runs"]]
        expected = mean_std([100 * x for x in shares]) if None not in shares else None
        assert row["pwca_share_mean"] == (pytest.approx(expected) if expected else None)
        assert (expected is None) == (row["variant"] in ("SA only", "+GLCA"))
        same = [json.loads(open(f"{run['run_dir']}/metrics.jsonl").readlines()[-2]).get("pwca_same_class")
                for run in row["runs"]]
        assert row["pwca_same_class"] == (pytest.approx(mean_std(same)) if expected else None)
        assert row["mark_hit_rollout"] is not None
    md = (out / "ablation.md").read_text()
    assert "PWCA share on the distractor (%) | same-class PWCA pairs (%) | mark hit, rollout (%)" in md
    first = summary["rows"][0]
    assert f"| SA only | {first['last_top1'][0]:.2f} ± {first['last_top1'][1]:.2f} | +0.00 |" in md
    assert json.loads((out / "ablation.json").read_text())["rows"][3]["variant"] == "DCAL"
    with Image.open(out / "ablation.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_every_evaluated_epoch_is_kept_and_drawn_as_curves(ablation):
    """ablation.json keeps each run's every epoch (test score where evaluated, train top-1, PWCA share, loss
    weights); ablation_curves.png draws them per variant, and the table's number stays the last epoch's."""
    from dcal.ablation import _band

    _, out, summary, _ = ablation
    saved = json.loads((out / "ablation.json").read_text())
    for row, saved_row in zip(summary["rows"], saved["rows"], strict=True):
        for run, saved_run in zip(row["runs"], saved_row["runs"], strict=True):
            records = [json.loads(x) for x in open(f"{run['run_dir']}/metrics.jsonl")][:-1]
            assert [p["epoch"] for p in saved_run["curve"]] == [r["epoch"] for r in records] == [1, 2]
            assert [p["top1"] for p in saved_run["curve"]] == [r["top1"] for r in records]
            assert all(0 <= p["train_top1"] <= 100 for p in saved_run["curve"])
            assert ("pwca_share_mean" in saved_run["curve"][0]) == (row["variant"] not in ("SA only", "+GLCA"))
            assert saved_run["curve"][-1]["top1"] == run["last"]["top1"]
        epochs, mean, sd = _band(row["runs"], "top1")
        assert epochs == [1, 2] and mean[-1] == pytest.approx(row["last_top1"][0])
        assert sd[-1] == pytest.approx(row["last_top1"][1])
    with Image.open(out / "ablation_curves.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 300


def test_the_curve_bands_are_drawn_on_the_scale_of_their_lines(tmp_path, monkeypatch):
    """The band of a percentage panel (PWCA share, stored as a fraction) surrounds its line: mean ± std, both
    scaled, never the unscaled mean with a scaled std."""
    import matplotlib.axes

    from dcal.ablation import plot_curves

    def run(shares):
        return {"curve": [{"epoch": e, "top1": 50.0 + e + s, "train_top1": 60.0, "pwca_share_mean": 0.4 + s / 100}
                          for e, s in zip((1, 2), shares, strict=True)]}

    summary = {"metrics": ["top1"], "sets": ["t"],
               "rows": [{"variant": "DCAL", "runs": [run((0, 0)), run((2, 2))]}]}
    bands = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **kw: bands.append((lo, hi)) or real(self, x, lo, hi, **kw))
    plot_curves(summary, tmp_path / "c.png")
    lo, hi = bands[-1]  # the PWCA share panel, in %
    assert all(a < 41.0 < b for a, b in zip(lo, hi, strict=True))


def test_rerun_reuses_and_an_interrupted_run_resumes(ablation):
    recipe, out, summary, _ = ablation
    dcal_run = out / "dcal" / "seed1"
    metrics = dcal_run / "metrics.jsonl"
    kept = metrics.read_text().splitlines()[:-1]  # as if killed while the final record was being written
    metrics.write_text("\n".join(kept) + '\n{"final": tr')
    with logged("dcal.ablation") as lines:
        again = run_ablation(recipe, ["table3", "selection"], seeds=2, overrides=["model.glca_blocks=2"],
                             output_dir=out)
    assert sum("(reused" in line for line in lines) == 13 and sum("(resumed" in line for line in lines) == 1
    assert [r["last_top1"] for r in again["rows"]] == [r["last_top1"] for r in summary["rows"]]


def test_a_moved_ablation_folder_is_reused(ablation, tmp_path):
    recipe, out, summary, _ = ablation
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with logged("dcal.ablation") as lines:
        again = run_ablation(recipe, ["table3", "selection"], seeds=2, overrides=["model.glca_blocks=2"],
                             output_dir=moved)
    assert sum("(reused" in line for line in lines) == 14
    assert [r["last_top1"] for r in again["rows"]] == [r["last_top1"] for r in summary["rows"]]


def test_a_subset_of_variants_reuses_their_runs_and_reports_only_them(ablation, capsys):
    recipe, out, summary, _ = ablation
    assert [v.name for v in plan(["table3"], 6, ["SA only", "dcal"])] == ["SA only", "DCAL"]  # name or folder name
    with logged("dcal.ablation") as lines:
        assert main(["ablation", "--config", str(recipe), "--set", "table3", "--variants", "DCAL,sa_only",
                     "--seeds", "2", "--output-dir", str(out), "model.glca_blocks=2"]) == 0
    assert sum("(reused" in line for line in lines) == 4  # two variants x two seeds, nothing trained
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert list(rows) == ["SA only", "DCAL"]
    first = {r["variant"]: r for r in summary["rows"]}
    assert [list(rows[v]["last_top1"]) for v in rows] == [list(first[v]["last_top1"]) for v in rows]
    assert main(["ablation", "--config", str(recipe), "--variants", "DCAL,GLCA", "--output-dir", str(out)]) == 2
    assert "variant(s) ['GLCA'] not in the set(s) table3: choose from 'SA only', '+GLCA'" in capsys.readouterr().err


def test_a_variant_trained_earlier_under_another_name_is_reused(ablation):
    """``--set pairs`` after ``--set table3`` in one folder: pairs' "random" is DCAL's config, so its runs are
    DCAL's, reused from its folder: nothing trains, though a folder named "random" (selection's, another config)
    is there too."""
    recipe, out, summary, _ = ablation
    with logged("dcal.ablation") as lines:
        assert main(["ablation", "--config", str(recipe), "--set", "pairs", "--variants", "random", "--seeds", "2",
                     "--output-dir", str(out)]) == 0
    assert sum("(reused" in line for line in lines) == 2
    saved = json.loads((out / "ablation.json").read_text())["rows"]
    dcal = next(r for r in summary["rows"] if r["variant"] == "DCAL")
    assert [r["run_dir"] for r in saved[0]["runs"]] == [r["run_dir"] for r in dcal["runs"]]


def test_a_run_dir_with_another_config_is_not_overwritten(ablation):
    recipe, out, _, _ = ablation
    before = (out / "sa_only" / "seed0" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="another config"):
        run_ablation(recipe, ["table3"], seeds=1, overrides=["train.epochs=1"], output_dir=out)
    assert (out / "sa_only" / "seed0" / "metrics.jsonl").read_text() == before


def test_sets_and_errors(tmp_path, capsys):
    variants = plan(["pairs", "blocks"], 12)
    assert [v.name for v in variants] == ["random", "intra-class", "inter-class", "1:1 mix", "noise", "M=1, T=12",
                                          "M=2, T=12", "M=3, T=12", "M=1, T=6", "M=1, T=1"]
    assert [v.reference for v in variants] == ["random"] * 5 + ["M=1, T=12"] * 5  # each set's first row
    # a reference left out by --variants: the first variant kept stands in for it
    assert [v.reference for v in plan(["table3", "pairs"], 6, ["DCAL", "noise", "inter-class"])] == ["DCAL"] * 3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["ablation", "--config", str(recipe), "--set", "table9", "--output-dir", str(tmp_path / "o")]) == 2
    assert "table9" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["ablation", "--config", str(recipe), "--set", "blocks", "model.pwca_blocks=x",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(s, 1.0)


def test_difference_se_and_the_rows_seeds_do_not_separate():
    """Welch's standard error of a difference of means, by hand; the table gives Δ in those units and names the
    rows within 2 SE of their reference (what the evidence protocol's "5 seeds where closer" rule reads)."""
    assert difference_se([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(math.sqrt(1.0 / 3 + 2.0 / 2))
    assert difference_se([1.0], [2.0, 3.0]) is None and difference_se([1.0, 1.0], [2.0, 2.0]) is None

    def row(name, ref, last, se):
        return {"variant": name, "reference": ref, "keys": {}, "runs": [{}, {}, {}], "last_top1": (last, 0.5),
                "best_top1": (last, 0.5), "delta_top1": last - 50.0, "delta_se_top1": se, "train_time_s": (1, 0)}

    md = format_markdown({"metrics": ["top1"], "rows": [row("SA only", "SA only", 50.0, None),
                                                        row("+PWCA", "SA only", 53.0, 1.0),
                                                        row("DCAL", "SA only", 51.5, 1.0)]})
    assert "| SA only | 50.00 ± 0.50 | +0.00 |" in md and "| +PWCA | 53.00 ± 0.50 | +3.00 (3.0 SE) |" in md
    assert "| DCAL | 51.50 ± 0.50 | +1.50 (1.5 SE) |" in md
    assert "first row of the variant's set (SA only)" in md
    assert "Within two standard errors of their reference, not told apart by 3 seeds: DCAL." in md


def test_max_seeds_adds_seeds_to_the_rows_within_two_se_of_their_reference(tmp_path, monkeypatch, capsys):
    """``--max-seeds``: after ``--seeds``, each row closer than two standard errors to its reference, and that
    reference, gets seeds up to the maximum (a row sharing their runs too: rollout is DCAL); the others keep theirs;
    the table says which and how many. Runs are faked here (the rule is under test, not training)."""
    import dcal.ablation as ablation_module

    # last top-1 per folder and seed: +GLCA 0.5 above SA only and selection's random 0.5 above rollout (= DCAL),
    # with a seed spread of ~1.4: closer than 2 SE; +PWCA, DCAL, last layer, glca_pool=cls 10+ away: far
    level = {"sa_only": 50.0, "plus_glca": 50.5, "plus_pwca": 60.0, "dcal": 60.0, "random": 60.5,
             "last_layer": 70.0, "glca_pool_cls": 80.0}
    trained = []

    def fake_run_one(cfg, run_dir):
        trained.append(f"{run_dir.parent.name}/{run_dir.name}")
        return {"epoch": 1}, "trained"

    def fake_result(final, run_dir, task, seed):
        top1 = level[run_dir.parent.name] + (-1.0, 1.0, 0.25)[seed]
        return {"seed": seed, "run_dir": str(run_dir), "epochs": 1, "curve": [], "last": {"top1": top1},
                "best": {"top1": top1}, "best_epoch": 1, "mechanism": {}, "train_time_s": 1.0}

    monkeypatch.setattr(ablation_module, "run_one", fake_run_one)
    monkeypatch.setattr(ablation_module, "run_result", fake_result)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    # a user's file where a seed no row needs would go (+PWCA's third) stops nothing; where one is needed it would
    foreign = tmp_path / "out" / "plus_pwca" / "seed2"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with logged("dcal.ablation") as lines:
        assert main(["ablation", "--config", str(recipe), "--set", "table3,selection", "--seeds", "2",
                     "--max-seeds", "3", "--output-dir", str(tmp_path / "out")]) == 0
    assert (foreign / "notes.txt").read_text() == "mine"
    assert trained[:14] == [f"{s}/seed{k}" for s in level for k in (0, 1)]
    assert trained[14:] == ["sa_only/seed2", "plus_glca/seed2", "dcal/seed2", "random/seed2"]
    assert any(line.startswith("[18/18] random seed 2:") for line in lines)
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert {r["variant"]: len(r["runs"]) for r in saved["rows"]} == {
        "SA only": 3, "+GLCA": 3, "+PWCA": 2, "DCAL": 3, "rollout": 3, "random": 3, "last layer": 2,
        "glca_pool=cls": 2}
    assert saved["extended"] == ["SA only", "+GLCA", "DCAL", "rollout", "random"] and saved["max_seeds"] == 3
    glca = saved["rows"][1]  # the numbers are the three seeds'
    assert glca["last_top1"] == pytest.approx(mean_std([49.5, 51.5, 50.75]))
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| variant | seeds | top-1 last epoch |" in md and "| +PWCA | 2 | 60.00 ± 1.41 |" in md
    assert ("Within two standard errors of their reference at 2 seeds, so given 3 (--max-seeds): SA only, +GLCA, "
            "DCAL, rollout, random.") in md
    assert "Mean ± sample std over the seeds of each row (column seeds)" in md
    # a folder an extra seed needs, not dcal's: refused before any extra seed trains; the first seeds' runs stay
    trained.clear()
    (tmp_path / "out" / "random" / "seed2").mkdir(parents=True)
    (tmp_path / "out" / "random" / "seed2" / "notes.txt").write_text("mine")
    assert main(["ablation", "--config", str(recipe), "--set", "table3,selection", "--seeds", "2",
                 "--max-seeds", "3", "--output-dir", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "out" / "random" / "seed2") in capsys.readouterr().err
    assert len(trained) == 14 and not any(t.endswith("seed2") for t in trained)  # the first seeds, reused
    with pytest.raises(ValueError, match=r"max_seeds \(1\) must be at least seeds \(2\)"):
        run_ablation(recipe, ["table3"], seeds=2, max_seeds=1, output_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()
