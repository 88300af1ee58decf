"""Attention pictures: the GLCA probabilities are the ones the model's GLCA block uses, the PWCA split is exact for
self-pairs, and dcal visualize draws one row per picture kind on the user's own images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.cli import main
from dcal.model.attention import _finish_block, attn_output, q_and_kv
from dcal.visualize import glca_attention_maps, pwca_attention_maps
from tests.helpers import tiny_model


@pytest.fixture
def model():
    return tiny_model(img_size=32, patch_size=8, top_r=0.25).eval()


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_glca_probabilities_reproduce_the_glca_block(pool):
    model = tiny_model(img_size=32, patch_size=8, top_r=0.25, glca_pool=pool).eval()
    images = torch.randn(3, 3, 32, 32)
    selected, probs = model.glca_attention(images)
    n_local = selected.shape[1]
    assert n_local == 4 and probs.shape == (3, 4 + (pool == "cls"), 17)  # 16 patches x 25%; CLS + 16 tokens
    with torch.no_grad():
        x0, rope = model._embed(images)
        x_prev, x, att = model._sa_stream(x0, rope, need_attn=True)
        assert torch.equal(model._select(att, x), selected)
        queries = model.glca_queries(x_prev, selected)
        blk = model.glca_blocks[0]
        hq = blk.norm1(queries)
        q, k, v = q_and_kv(blk.attn, hq, blk.norm1(x_prev))
        per_head = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        torch.testing.assert_close(per_head.mean(dim=1), probs, atol=1e-6, rtol=1e-5)
        mine = _finish_block(blk, queries, attn_output(blk.attn, per_head @ v, hq))
        torch.testing.assert_close(mine, model._glca_stream(x_prev, selected), atol=1e-5, rtol=1e-5)
    maps, scores = glca_attention_maps(model, images)
    assert maps.shape == (3, 32, 32) and scores.shape == (3, 16)
    assert maps.min() == 0.0 and maps.max() == pytest.approx(1.0)
    np.testing.assert_allclose(scores, probs[:, -n_local:, 1:].mean(dim=1).numpy(), rtol=1e-6)


def test_pwca_split_between_target_and_distractor(model):
    images = torch.randn(4, 3, 32, 32)
    self_pairs = pwca_attention_maps(model, images, pairs=torch.arange(4))
    # paired with itself, every key appears twice: exactly half of the attention goes to the "distractor"
    np.testing.assert_allclose(self_pairs["share"], 0.5, atol=1e-6)
    np.testing.assert_allclose(self_pairs["target"], self_pairs["distractor"], atol=1e-6)
    real = pwca_attention_maps(model, images)
    assert real["pairs"].tolist() == [1, 2, 3, 0]
    assert ((real["share"] > 0) & (real["share"] < 1)).all() and real["target"].shape == (4, 32, 32)
    assert not np.allclose(real["share"], 0.5)


def test_visualize_cli_on_own_images(fgvc_run, tmp_path, capsys):
    run, data = fgvc_run
    files = sorted((data / "test").rglob("*.png"))[:3]
    out = tmp_path / "pic.png"
    assert main(["visualize", "--run", str(run), "--output", str(out), "--images", *map(str, files)]) == 0
    with Image.open(out) as im:
        # 3 columns; rows: image, SA rollout, GLCA, PWCA on the target, PWCA on the distractor (2.2 x 2.4 in, 110 dpi)
        assert im.size == (round(2.2 * 3 * 110), round(2.4 * 5 * 110))


def test_names_are_wrapped_or_lose_their_middle_never_their_distinguishing_end():
    from dcal.names import shorten, wrap, wrap_all

    assert wrap("013.Red_faced_Cormorant", 18) == "013.Red_faced_\nCormorant"  # broken after a word, nothing lost
    assert wrap("short") == "short"
    long = "Spotted_Catbird_0001_19243_a_very_long_file_name.jpg"
    assert shorten(long, 21) == "Spotted_Ca…e_name.jpg" and len(wrap(long, 10, 2).replace("\n", "")) == 20
    # side by side, two names that would read the same lose their common prefix instead
    a, b = "Spotted_Catbird_with_a_long_name_0001.jpg", "Spotted_Catbird_with_a_long_name_0002.jpg"
    titles = wrap_all([a, b], 10, 2)
    assert titles[0] != titles[1] and titles[0].replace("\n", "").endswith("0001.jpg")
    assert wrap_all(["x", "x"]) == ["x", "x"]  # equal names stay equal


def test_prediction_titles_mark_wrong_predictions_in_red():
    from dcal.visualize import WRONG, prediction_titles

    titles, colors = prediction_titles(["013.Red_faced_Cormorant", "014.Red_faced_Cuckoo"],
                                       {"pred": ["013.Red_faced_Cormorant", "013.Red_faced_Cormorant"]},
                                       truths=["013.Red_faced_Cormorant", "014.Red_faced_Cuckoo"])
    assert titles[0] == "013.Red_faced_\nCormorant\npred \u2713" and colors[0] == "black"
    assert "pred \u2717" in titles[1] and "Cormorant" in titles[1] and colors[1] == WRONG
    titles, colors = prediction_titles(["a.jpg"], {"pred": ["alpha"]})  # truth unknown: no mark, no colour
    assert titles == ["a.jpg\npred: alpha"] and colors == ["black"]


def test_one_picture_pipeline_for_visualize_and_the_demo(monkeypatch, tmp_path):
    """dcal demo's picture (SA-only and DCAL side by side) and dcal visualize's (one model) are one function: each
    model's rows, named when there are several, with the rows and titles the demo drew before they were one."""
    import dcal.visualize as vis

    torch.manual_seed(0)
    sa_only = tiny_model(img_size=32, patch_size=8, top_r=0.25, glca_blocks=0, pwca_blocks=0).eval()
    full = tiny_model(img_size=32, patch_size=8, top_r=0.25).eval()
    images = torch.randn(3, 3, 32, 32)
    classes = ["a", "b", "c", "d", "e"]
    drawn = {}
    monkeypatch.setattr(vis, "save_attention_figure", lambda path, shown, rows, titles, title_colors: drawn.update(
        shown=shown, rows=rows, titles=titles, colors=title_colors) or path)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    truths = ["a", "b", "c"]
    vis.save_attention_picture(tmp_path / "p.png", {"SA only": sa_only, "DCAL": full}, images, mean, std, truths,
                               classes, truths)
    shown = vis.denormalize(images, mean, std)
    np.testing.assert_array_equal(drawn["shown"], shown)
    # the demo's rows before: SA-only's rollout (no GLCA, so no boxes), then DCAL's rows, each named
    sa_maps, _ = vis.rollout_maps(sa_only, images)
    assert [r["label"] for r in drawn["rows"]] == [
        "SA only: SA rollout", "DCAL: SA rollout\n(boxes: GLCA queries)", "DCAL: GLCA: local queries'\nattention",
        *[f"DCAL: {r['label']}" for r in vis.attention_rows(full, images, shown)[2:]]]
    assert "boxes" not in drawn["rows"][0] and drawn["rows"][1]["boxes"].any()
    np.testing.assert_array_equal(drawn["rows"][0]["maps"], sa_maps)
    for mine, theirs in zip(drawn["rows"][1:], vis.attention_rows(full, images, shown), strict=True):
        np.testing.assert_array_equal(mine["maps"], theirs["maps"])
    with torch.no_grad():
        preds = {name: [classes[p] for p in m.predict(images).argmax(-1).tolist()]
                 for name, m in (("SA only", sa_only), ("DCAL", full))}
    assert (drawn["titles"], drawn["colors"]) == vis.prediction_titles(truths, preds, truths)
    # one model (dcal visualize): its rows unnamed; Re-ID (no classes): no prediction line
    vis.save_attention_picture(tmp_path / "p.png", {"pred": full}, images, mean, std, ["x", "y", "z"])
    assert drawn["rows"][0]["label"] == "SA rollout\n(boxes: GLCA queries)" and drawn["titles"] == ["x", "y", "z"]
