"""dcal.mechanism: the mark-hit geometry on hand-built cases, the selections it scores are the model's own, PWCA's
self-pair split, and the keys evaluate() writes into metrics.jsonl for tiny synthetic runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcal.config import load_config
from dcal.data.fgvc import SyntheticFGVC
from dcal.data.transforms import build_transforms
from dcal.engine import build_datasets, build_model, fit
from dcal.mechanism import (
    evaluate_mechanism,
    fixed_derangement,
    mark_box_in_input,
    mark_hit_chance,
    mark_hits,
    on_mark_patches,
    patches_on_boxes,
    pwca_share,
    selection_scores,
)
from dcal.model.rollout import select_top
from tests.helpers import TINY_TIMM_KWARGS, logged, tiny_model


@pytest.mark.parametrize(("source", "resize", "img_size", "box"), [
    (64, 72, 64, (20, 9, 14)), (64, None, 32, (3, 40, 14)), (48, [60, 52], [48, 40], (30, 2, 11))])
def test_mark_box_follows_the_test_transform(source, resize, img_size, box):
    """A white box on black through the real FGVC test transform lands where mark_box_in_input says."""
    y0, x0, m = box
    img = np.zeros((source, source, 3), np.uint8)
    img[y0:y0 + m, x0:x0 + m] = 255
    tf = build_transforms("fgvc", False, img_size if isinstance(img_size, int) else tuple(img_size),
                          resize=None if resize is None else (resize if isinstance(resize, int) else tuple(resize)),
                          mean=(0, 0, 0), std=(1, 1, 1))
    out = tf(Image.fromarray(img))[0].numpy()
    by0, bx0, by1, bx1 = mark_box_in_input(box, source, img_size, resize)
    yy, xx = np.mgrid[0:out.shape[0], 0:out.shape[1]] + 0.5
    inside = (yy > by0 + 1.5) & (yy < by1 - 1.5) & (xx > bx0 + 1.5) & (xx < bx1 - 1.5)
    outside = (yy < by0 - 1.5) | (yy > by1 + 1.5) | (xx < bx0 - 1.5) | (xx > bx1 + 1.5)
    assert inside.any() and outside.any()
    assert out[inside].min() > 0.95 and out[outside].max() < 0.05


def test_patches_on_boxes_take_half_a_patch_or_more():
    # 4x4 grid of 8-pixel patches; box rows 0..12, columns 0..8: patch (0,0) fully, patch (1,0) exactly half
    on = patches_on_boxes(torch.tensor([[0.0, 0.0, 12.0, 8.0], [0.0, 0.0, 11.9, 8.0], [2.0, 2.0, 14.0, 14.0]]),
                          (4, 4), (8, 8))
    assert on[0].nonzero().flatten().tolist() == [0, 4]
    assert on[1].nonzero().flatten().tolist() == [0]  # patch (1,0): 3.9 of 8 rows, less than half
    # rows 2..14 x columns 2..14: each of the 4 patches has 6x6 = 36 of 64 pixels (> half)
    assert on[2].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # overlapping patches (stride 4, 3x3 grid of 8-pixel patches): patch (r, c) spans [4r, 4r + 8)
    on = patches_on_boxes(torch.tensor([[4.0, 4.0, 12.0, 12.0]]), (3, 3), (8, 8), (4, 4))
    # (1,1) = [4, 12)^2 fully; its 4 edge neighbours 4x8 = 32 of 64 (half); the corners 4x4 = 16 (no)
    assert on[0].nonzero().flatten().tolist() == [1, 3, 4, 5, 7]


def test_mark_hits_and_chance_on_a_hand_built_case():
    on_mark = torch.zeros(2, 16, dtype=torch.bool)
    on_mark[0, [5, 6, 9, 10]] = True
    on_mark[1, [0]] = True
    selected = torch.tensor([[5, 9, 0], [1, 2, 3]])
    torch.testing.assert_close(mark_hits(selected, on_mark), torch.tensor([2 / 3, 0.0]))
    # chance: the patches on the mark over all patches (the mean hit of every k-subset)
    torch.testing.assert_close(mark_hit_chance(on_mark), torch.tensor([4 / 16, 1 / 16]))
    subsets = torch.combinations(torch.arange(16), 3)
    mean_hit = mark_hits(subsets, on_mark[0].expand(len(subsets), -1)).mean()
    assert float(mean_hit) == pytest.approx(4 / 16)


def test_on_mark_patches_of_a_synthetic_image():
    """The demo's geometry: 64-px images resized to 72 and centre-cropped to 64, 8x8 patches."""
    model = tiny_model(img_size=64, patch_size=8)
    # a 14-px mark at (20, 9) -> (18.5, 6.1)-(34.25, 21.9) in the crop: rows 2-3 (3/8 of row 4), columns 1-2
    on = on_mark_patches(model, [(20, 9, 14)], 64, 64, 72)
    assert on.shape == (1, 64) and on[0].nonzero().flatten().tolist() == [17, 18, 25, 26]


@pytest.mark.parametrize("selection", ["rollout", "last_layer"])
def test_scored_selections_are_the_models_own(selection):
    """What the mechanism scores is exactly what GLCA would take with that query_selection."""
    model = tiny_model(img_size=32, patch_size=8, top_r=0.25, query_selection=selection).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        own = model(images)["selected"]
    mine = select_top(selection_scores(model, images)[selection], model.num_local_queries)
    assert torch.equal(own, mine)


def test_pwca_share_of_self_pairs_is_one_half_in_every_block():
    model = tiny_model(img_size=32, patch_size=8).eval()
    images = torch.randn(4, 3, 32, 32)
    self_share = pwca_share(model, images, pairs=torch.arange(4))
    assert self_share.shape == (3, 4)  # T = 3 blocks x 4 images
    torch.testing.assert_close(self_share, torch.full((3, 4), 0.5), atol=1e-6, rtol=0)
    real = pwca_share(model, images)
    assert ((real > 0) & (real < 1)).all() and not torch.allclose(real, torch.full((3, 4), 0.5))
    assert fixed_derangement(4).tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="no PWCA"):
        pwca_share(tiny_model(img_size=32, patch_size=8, pwca_blocks=0), images)


SYNTH = ["data.dataset=synthetic", "data.root=unused", "data.resize=40", "data.synthetic_image_size=32",
         "data.synthetic_num_classes=3", "data.synthetic_train_per_class=4", "data.synthetic_test_per_class=5",
         "model.img_size=32", TINY_TIMM_KWARGS,
         "model.top_r=0.25", "train.epochs=1", "train.batch_size=6", "train.workers=0", "eval.batch_size=4"]


def test_evaluate_mechanism_direct_values():
    """Chance is computed from the dataset's own boxes; chunks of the eval batch give one share per block."""
    cfg = load_config(None, [*SYNTH, "model.pwca_blocks=2"])
    test = build_datasets(cfg, train=False)["test"]
    model = build_model(cfg, 3).eval()
    out = evaluate_mechanism(model, test, torch.device("cpu"), cfg, num_images=10)
    on = on_mark_patches(model, test.mark_boxes[:10], 32, 32, 40)
    assert out["mechanism_images"] == 10
    assert out["mark_hit_chance"] == pytest.approx(100 * float(on.float().mean()))
    assert len(out["pwca_share"]) == 2 and out["pwca_share_mean"] == pytest.approx(np.mean(out["pwca_share"]))
    coarse = SyntheticFGVC("test", num_classes=3, test_per_class=2, image_size=32, task="coarse",
                           transform=test.transform)
    assert set(evaluate_mechanism(model, coarse, torch.device("cpu"), cfg)) == {"mechanism_images", "pwca_share",
                                                                               "pwca_share_mean"}


@pytest.mark.parametrize("variant", ["dcal", "sa_only"])
def test_evaluate_writes_the_mechanism_keys(tmp_path, variant):
    blocks = ["model.glca_blocks=0", "model.pwca_blocks=0", "eval.fusion=sa"] if variant == "sa_only" else \
        ["model.pwca_blocks=2"]
    out = tmp_path / variant
    fit(load_config(None, [*SYNTH, *blocks, f"output_dir={out}"]))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("mark_hit_rollout", "mark_hit_last_layer", "mark_hit_chance"):
        assert 0.0 <= record[key] <= 100.0
    assert 0.0 < record["mark_hit_chance"] < 25.0 and record["mechanism_images"] == 15
    if variant == "dcal":
        assert len(record["pwca_share"]) == 2 and all(0.0 < s < 1.0 for s in record["pwca_share"])
        assert {"weight_sa", "weight_glca", "weight_pwca"} <= set(record)  # the learned loss weights
    else:
        assert "pwca_share" not in record and "pwca_share_mean" not in record


@pytest.mark.parametrize("strategy", ["intra", "intra pk", "inter", "noise"])
def test_training_records_the_same_class_share_its_pwca_pairs_got(tmp_path, monkeypatch, strategy):
    """Each epoch's record gives the share (%) of training images whose PWCA distractor was of their own class,
    from the pairs the model drew; an ``intra`` run whose batches lack same-class partners (6 classes x 2 images,
    batches of 4: most images have none) warns that it got far less than it asked for, and P x K batches
    (``train.sampler=pk``) give it every partner it asks for. Noise has no distractor."""
    strategy, *pk = strategy.split()
    import dcal.model.dcal as model_module

    drawn = []
    real = model_module.sample_pairs

    def spy(strategy, batch_size, targets=None, *args, **kwargs):
        pairs = real(strategy, batch_size, targets, *args, **kwargs)
        drawn.append((targets[pairs] == targets).sum().item() / batch_size)
        return pairs

    monkeypatch.setattr(model_module, "sample_pairs", spy)
    out = tmp_path / f"{strategy}{'_pk' if pk else ''}"
    synth = [o for o in SYNTH if not o.startswith(("data.synthetic_num_classes", "data.synthetic_train_per_class",
                                                   "train.batch_size"))]
    with logged("dcal.engine.run") as lines:
        fit(load_config(None, [*synth, "data.synthetic_num_classes=6", "data.synthetic_train_per_class=2",
                               "train.batch_size=4", "train.eval_every=9", "model.pwca_blocks=2",
                               f"model.pair_strategy={strategy}", f"output_dir={out}",
                               *(["train.sampler=pk", "train.num_instances=2"] if pk else [])]))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    warned = [line for line in lines if "same-class PWCA pairs" in line]
    if strategy == "noise":
        assert "pwca_same_class" not in record and not drawn and not warned
        return
    assert len(drawn) == 3 and record["pwca_same_class"] == pytest.approx(100 * sum(drawn) / len(drawn))
    if strategy == "inter":
        assert record["pwca_same_class"] == 0.0 and not warned
    elif pk:
        assert record["pwca_same_class"] == 100.0 and not warned
    else:
        assert record["pwca_same_class"] < 90.0
        assert len(warned) == 1 and f"got {record['pwca_same_class']:.1f}%" in warned[0] and "batch of 4" in warned[0]


def test_pwca_attention_in_query_tiles_equals_the_whole_matrix(monkeypatch):
    """The memory bound of the mechanism measurement: the weighted row computed a tile of query rows at a time
    equals the one from the whole probability matrix; the class-token row alone equals the full matrix's row 0."""
    import dcal.model.dcal as dcal_module
    from tests.helpers import tiny_model

    torch.manual_seed(0)
    model = tiny_model(img_size=32, patch_size=8).eval()
    images, pairs = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 0])
    weights = torch.rand(3, 17).softmax(-1)
    with torch.no_grad():
        whole = model.pwca_attention(images, pairs, weights)
        cls_rows = model.pwca_attention(images, pairs)
        monkeypatch.setattr(dcal_module, "PWCA_QUERY_TILE", 4)  # 17 rows in tiles of 4
        tiled = model.pwca_attention(images, pairs, weights)
        one_hot = torch.zeros(3, 17)
        one_hot[:, 0] = 1
        row0 = model.pwca_attention(images, pairs, one_hot)
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(cls_rows, row0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
