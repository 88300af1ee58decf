"""dcal export: the ONNX inference graph (SA + GLCA with rollout and top-R selection, no PWCA) run by onnxruntime
equals PyTorch on the same inputs, at a batch size other than the traced one; the .safetensors export reloads.

Tolerance: 1e-5 absolute on probabilities (FGVC) and 1e-4 on embeddings (Re-ID, unnormalised features of
magnitude ~1-10); every image must select the same set of local queries (the GLCA output does not depend on
their order, which near-ties in the rollout may swap)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dcal
from dcal.cli import main
from dcal.export import InferenceGraph
from dcal.inference import list_images
from tests.helpers import tiny_model
from tests.tiny_runs import CLASSES

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dcal[onnx]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'dcal[onnx]')")


def _batch(loaded, paths):
    from PIL import Image

    return torch.stack([loaded.transform(Image.open(p).convert("RGB")) for p in paths])


def test_fgvc_onnx_matches_pytorch_and_safetensors_reloads(fgvc_run, tmp_path, capsys):
    run, data = fgvc_run
    path, weights = tmp_path / "model.onnx", tmp_path / "weights.safetensors"
    assert main(["export", "--run", str(run), "--onnx", str(path), "--safetensors", str(weights)]) == 0
    assert "same_selection True" in capsys.readouterr().out  # the command's own onnxruntime check

    loaded = dcal.load_model(run=run, device="cpu")
    images = _batch(loaded, list_images([data / "test"]))  # 6 images; the graph was traced with 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probs", "selected"]
    probs, selected = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        out = loaded.model(images, branches=("sa", "glca"))
        want = (out["logits"]["sa"].softmax(-1) + out["logits"]["glca"].softmax(-1)) / 2
    assert probs.shape == (6, 3) and selected.shape == (6, 2)  # 16 patches, R = 10% -> 2 local queries
    np.testing.assert_allclose(probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.sort(selected, -1), out["selected"].sort(-1).values.numpy())
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["classes"]) == list(CLASSES) and json.loads(meta["img_size"]) == [32, 32]

    reloaded = dcal.load_model(checkpoint=weights, device="cpu")
    assert reloaded.classes == list(CLASSES)
    a = dcal.predict(reloaded, images, topk=3)
    b = dcal.predict(loaded, images, topk=3)
    assert [p.indices for p in a] == [p.indices for p in b]
    np.testing.assert_allclose([p.probabilities for p in a], [p.probabilities for p in b], atol=1e-6)


def test_reid_onnx_embedding(reid_run, tmp_path):
    run, root = reid_run
    path = tmp_path / "reid.onnx"
    assert main(["export", "--run", str(run), "--onnx", str(path), "--after-bn", "--no-check"]) == 0
    loaded = dcal.load_model(run=run, device="cpu")
    images = _batch(loaded, list_images([root / "query"]) + list_images([root / "bounding_box_test"]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    emb, selected = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = loaded.model.embed(images, after_bn=True)
        want_sel = loaded.model(images, branches=("sa", "glca"))["selected"]
    assert emb.shape == (15, 96) and selected.shape == (15, 3)  # concat(SA, GLCA) of 48 each; 8 patches x 30%
    np.testing.assert_allclose(emb, want.numpy(), atol=1e-4)
    np.testing.assert_array_equal(np.sort(selected, -1), want_sel.sort(-1).values.numpy())


def test_sa_only_graph_has_no_selection(fgvc_run):
    loaded = dcal.load_model(run=fgvc_run[0], device="cpu")
    assert InferenceGraph(loaded.model, fusion="sa").output_names == ["probs"]


def test_onnx_batch_axis_at_448_where_the_rollout_tiles(tmp_path):
    """At 448 (T = 785) eager PyTorch computes the rollout in tiles of (image, head) problems; the exported graph
    must not bake the traced batch into that loop: traced at batch 2, run at 3 and 5, every image is computed."""
    from dcal.export import compare_with_onnxruntime, export_onnx

    model = tiny_model(num_classes=3, img_size=448, depth=2).eval()
    path = export_onnx(model, tmp_path / "m448.onnx")
    for batch in (3, 5):
        res = compare_with_onnxruntime(model, path, torch.randn(batch, 3, 448, 448))
        assert res["same_selection"], res
        assert res["max_abs_diff"] < 1e-5, res


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
                                  "vit_base_patch16_siglip_224"])
def test_onnx_of_register_rotary_and_pooled_backbones(tmp_path, name):
    """Registers (DINOv2-reg), rotary phases (EVA-02; DINOv3 with registers too) and attention pooling (SigLIP)
    export and run in onnxruntime like the class-token ViT."""
    import warnings

    from dcal.export import compare_with_onnxruntime, export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DINOv3's dynamic_img_size notice
        model = dcal.create_model(name, num_classes=3, img_size=32, patch_size=8, depth=2, embed_dim=48,
                                  num_heads=2, pwca_blocks=2, top_r=0.25).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    res = compare_with_onnxruntime(model, path, torch.randn(3, 3, 32, 32))
    assert res["same_selection"], res
    assert res["max_abs_diff"] < 1e-5, res
