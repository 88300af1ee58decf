"""Parameter-efficient fine-tuning (dcal.model.finetune): model.freeze_blocks and model.lora.

What must hold: an optimizer step leaves the frozen weights bit-identical and changes the trainable ones (GLCA
always among them); the optimizer is given the trainable parameters only; a LoRA model (adapters with non-zero B)
computes what its merged plain model computes, selection included, also on the gradient-checkpointing path that
recomputes the rollout's queries and keys; a dcal train run with either setting loads, exports and resumes."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import dcal
from dcal.cli import main
from dcal.config import ConfigError, load_config
from dcal.losses import DCALLoss, param_groups
from dcal.model.finetune import (
    STEM,
    TARGET_LINEARS,
    LoraSettings,
    apply_finetune,
    lora_target_names,
    merge_lora,
    merge_lora_state,
    merged_state_dict,
)
from dcal.vocabulary import LORA_TARGETS
from tests.helpers import tiny_model, write_images
from tests.tiny_runs import TINY_MODEL

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install 'dcal[lora]')")

LORA = LoraSettings(rank=4, alpha=8.0)


def _randomise_lora_b(model: nn.Module, std: float = 0.3) -> None:
    """peft starts B at 0 (the adapter adds nothing): give it values, so that a wrong path shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _step(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """One AdamW step of the full DCAL loss (SA, GLCA, PWCA); returns the weights before it."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crit = DCALLoss("fgvc", model.branches)
    opt = torch.optim.AdamW(param_groups(model, crit, 0.05), lr=1e-2)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    crit(model(x, targets=y), y).total.backward()
    opt.step()
    return before, opt


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_target_names_are_the_config_vocabulary():
    assert set(TARGET_LINEARS) == set(LORA_TARGETS)


@pytest.mark.parametrize("k", [2, 3])
def test_freeze_blocks_step_leaves_frozen_weights_and_trains_the_rest(k):
    model = apply_finetune(tiny_model(), freeze_blocks=k)  # depth 3: k = 3 freezes every backbone block
    before, opt = _step(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the optimizer gets what trains (and the loss weights), nothing frozen
    assert in_opt & {id(p) for p in model.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {n for n in before if n.startswith(tuple(f"backbone.{s}" for s in STEM))
              or any(n.startswith(f"backbone.blocks.{i}.") for i in range(k))}
    assert frozen and not frozen & trainable
    changed = _changed(model, before)
    assert not changed & frozen
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable  # no grad reaches frozen ones
    must_change = {"glca_blocks.0.attn.qkv.weight", "glca_blocks.0.mlp.fc2.weight", "glca_head.weight",
                   "backbone.head.weight", "backbone.norm.weight"}
    if k < 3:
        must_change |= {"backbone.blocks.2.attn.qkv.weight", "backbone.blocks.2.norm1.weight"}
    assert must_change <= changed


@needs_peft
def test_lora_step_trains_adapters_norms_glca_and_heads_only():
    model = apply_finetune(tiny_model(), lora=LORA)
    assert not any(hasattr(m, "lora_A") for m in model.glca_blocks.modules())  # GLCA stays plain
    before, _ = _step(model)
    changed = _changed(model, before)
    base = {n for n in before if n.startswith("backbone.") and (".base_layer." in n or n.split(".")[1] in STEM)}
    assert len([n for n in base if ".base_layer." in n]) == 3 * 4 * 2  # 3 blocks x 4 layers x (weight, bias)
    assert not changed & base
    for must in ("backbone.blocks.0.attn.qkv.lora_B.default.weight", "backbone.blocks.2.mlp.fc2.lora_B.default.weight",
                 "backbone.blocks.1.norm1.weight", "backbone.norm.weight", "backbone.head.weight",
                 "glca_blocks.0.attn.qkv.weight", "glca_norm.weight", "glca_head.weight"):
        assert must in changed, must


@needs_peft
def test_freeze_with_lora_puts_no_adapter_on_frozen_blocks():
    model = apply_finetune(tiny_model(), freeze_blocks=1, lora=LoraSettings(rank=2, targets=("qkv", "fc2")))
    adapted = sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    assert adapted == ["backbone.blocks.1.attn.qkv", "backbone.blocks.1.mlp.fc2", "backbone.blocks.2.attn.qkv",
                       "backbone.blocks.2.mlp.fc2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.blocks.0.norm1.weight" not in trainable and "backbone.blocks.1.norm1.weight" in trainable


@needs_peft
def test_lora_model_equals_its_merged_plain_model():
    torch.manual_seed(0)
    model = apply_finetune(tiny_model(), lora=LORA)
    _randomise_lora_b(model)
    plain = tiny_model()
    plain.load_state_dict(merged_state_dict(model))  # the plain model's keys, strict
    model.eval(), plain.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x, branches=("sa", "glca")), plain(x, branches=("sa", "glca"))
        unmerged = copy.deepcopy(model)
        for m in unmerged.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.default.weight.zero_()
        c = unmerged(x, branches=("sa", "glca"))
    assert (a["logits"]["sa"] - c["logits"]["sa"]).abs().max() > 1e-2  # the adapters do change the output
    for branch in ("sa", "glca"):
        torch.testing.assert_close(a["logits"][branch], b["logits"][branch], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["features"][branch], b["features"][branch], atol=1e-5, rtol=0)
    assert torch.equal(a["selected"], b["selected"])
    torch.testing.assert_close(model.cls_rollout(x), plain.cls_rollout(x), atol=1e-6, rtol=0)

    merge_lora(model)  # in place: plain nn.Linear layers, same function
    assert type(model.backbone.blocks[0].attn.qkv) is nn.Linear
    assert model.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(x, branches=("sa", "glca"))["logits"]["glca"], a["logits"]["glca"],
                                   atol=1e-5, rtol=0)


@needs_peft
def test_torch_compile_of_a_lora_model_gives_eager_outputs_and_gradients():
    """train.compile with adapters: peft's LoRA layers inside the compiled graph, same logits, selection and gradients
    (adapters, norms, GLCA and heads) as eager mode."""
    from dcal.model.dcal import compile_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = apply_finetune(tiny_model(), freeze_blocks=1, lora=LORA).train()
    _randomise_lora_b(model)
    x, pairs = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 0])
    ref = model(x, pairs=pairs)
    sum(v.sum() for v in ref["logits"].values()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = compile_model(model)(x, pairs=pairs)
    sum(v.sum() for v in got["logits"].values()).backward()
    for branch in model.branches:
        torch.testing.assert_close(got["logits"][branch], ref["logits"][branch], atol=1e-4, rtol=1e-4)
    assert torch.equal(got["selected"], ref["selected"])
    params = dict(model.named_parameters())
    assert any(".lora_A." in n for n in want) and {n for n, p in params.items() if p.grad is not None} == set(want)
    for name, g in want.items():
        torch.testing.assert_close(params[name].grad, g, atol=1e-4, rtol=1e-3, msg=name)


@needs_peft
@pytest.mark.parametrize("name, kwargs", [
    ("vit_small_patch14_reg4_dinov2", {}),  # registers
    ("vit_small_patch16_dinov3", {}),  # Eva: rotary phases, registers, layer scale
    ("eva02_tiny_patch14_224", {}),  # Eva: separate q/v biases beside the fused projection
    ("eva02_tiny_patch14_224", {"qkv_fused": False}),  # Eva: separate q/k/v projections
    ("vit_base_patch16_siglip_224", {}),  # no class token, attention pooling
])
def test_lora_on_register_and_rotary_backbones_equals_the_merged_model(name, kwargs):
    import warnings

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DINOv3's dynamic_img_size notice
            return dcal.create_model(name, num_classes=3, img_size=32, patch_size=8, depth=2, embed_dim=48,
                                     num_heads=2, pwca_blocks=2, top_r=0.25, **kwargs)

    torch.manual_seed(0)
    model = apply_finetune(build(), lora=LORA)
    _randomise_lora_b(model)
    plain = build()
    plain.load_state_dict(merged_state_dict(model))
    model.eval(), plain.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), plain(x)
    for branch in ("sa", "glca"):
        torch.testing.assert_close(a["logits"][branch], b["logits"][branch], atol=1e-5, rtol=0)
    assert torch.equal(a["selected"], b["selected"])
    model.train().set_grad_checkpointing(True)  # the recomputed queries/keys see the adapters too
    x0, rope = model._embed(x)
    _, x_last, att = model._sa_stream(x0, rope, need_attn=True)
    torch.testing.assert_close(model._scores(att, x_last, "rollout"), plain.selection_scores(x), atol=1e-5, rtol=1e-4)


@needs_peft
def test_hand_merge_equals_peft_merge():
    model = apply_finetune(tiny_model(), lora=LORA)
    _randomise_lora_b(model)
    merged = merge_lora_state(model.state_dict(), LORA.scaling)
    layer = model.backbone.blocks[1].mlp.fc1
    layer.merge()  # peft's own merge into the base layer
    torch.testing.assert_close(merged["backbone.blocks.1.mlp.fc1.weight"], layer.base_layer.weight, atol=1e-6, rtol=0)


@needs_peft
def test_stored_factors_are_checked_before_merging():
    from omegaconf import OmegaConf

    from dcal.model.finetune import plain_state

    state = apply_finetune(tiny_model(), lora=LORA).state_dict()
    cfg = OmegaConf.create({"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(LORA_TARGETS)})
    assert plain_state(state, cfg, "f.pth").keys() == tiny_model().state_dict().keys()
    key = "backbone.blocks.1.attn.qkv.lora_B.default.weight"
    for bad, what in (({**state, key: torch.zeros(5, 4)}, "(5, 4)"),
                      ({k: v for k, v in state.items() if k != key}, "None"),
                      (state, "rank=2")):
        with pytest.raises(ValueError, match="f.pth") as e:
            plain_state(bad, OmegaConf.merge(cfg, {"rank": 2}) if what == "rank=2" else cfg, "f.pth")
        assert what in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds LoRA factors but its config has model.lora.rank=0"):
        plain_state(state, OmegaConf.merge(cfg, {"rank": 0}), "f.pth")


@needs_peft
def test_checkpointed_rollout_recompute_sees_the_adapters():
    """With gradient checkpointing the rollout's queries and keys are recomputed from each SA block's input
    (attention.sa_query_key): reading the qkv weight directly would drop the adapter and select other patches."""
    torch.manual_seed(0)
    model = apply_finetune(tiny_model(pwca_blocks=0, top_r=0.25), lora=LoraSettings(rank=4, alpha=16.0))
    _randomise_lora_b(model, std=1.0)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = model(x, targets=y)
    model.set_grad_checkpointing(True)
    ckpt = model(x, targets=y)
    assert torch.equal(plain["selected"], ckpt["selected"])
    torch.testing.assert_close(plain["features"]["glca"], ckpt["features"]["glca"], atol=1e-6, rtol=0)
    torch.testing.assert_close(plain["features"]["sa"], ckpt["features"]["sa"], atol=1e-6, rtol=0)


def test_targets_by_module_type_in_eva_and_swiglu_blocks():
    import timm

    eva = timm.create_model("eva02_tiny_patch14_224", depth=2, embed_dim=48, num_heads=3, img_size=28,
                            qkv_fused=False, num_classes=0)
    assert lora_target_names(eva.blocks, ("qkv",), first=1) == ["1.attn.k_proj", "1.attn.q_proj", "1.attn.v_proj"]
    swiglu = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=3, img_size=32,
                               mlp_layer=timm.layers.SwiGLU, num_classes=0)
    assert lora_target_names(swiglu.blocks, ("fc1", "fc2")) == ["0.mlp.fc1_g", "0.mlp.fc1_x", "0.mlp.fc2"]


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze_blocks=-1"], "'model.freeze_blocks' must be in [0, 128]"),
    (["model.freeze_blocks=5", "model.pwca_blocks=4", "model.timm_kwargs={depth: 4}"],
     "'model.freeze_blocks' must be in [0, 4] (the backbone depth); got 5"),
    (["model.lora.rank=-2"], "'model.lora.rank' must be in [0, 4096]"),
    (["model.lora.alpha=0"], "'model.lora.alpha' must be in (0, 1e6]"),
    (["model.lora.dropout=1.0"], "'model.lora.dropout' must be in [0, 1)"),
    (["model.lora.targets=[qvk]"], "did you mean 'qkv'?"),
    (["model.lora.targets=[qkv,qkv]"], "'model.lora.targets' must be distinct names"),
    (["model.lora.targets=[]"], "at least one"),
    (["model.lora.rnak=4"], "did you mean 'model.lora.rank'?"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_depth_checked_when_built_and_missing_peft_named(monkeypatch):
    with pytest.raises(ValueError, match=r"model.freeze_blocks must be an int in \[0, 3\]"):
        apply_finetune(tiny_model(), freeze_blocks=4)
    with pytest.raises(ValueError, match="freeze_blocks=3 freezes all of them"):
        apply_finetune(tiny_model(), freeze_blocks=3, lora=LORA)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'dcal\[lora\]'"):
        apply_finetune(tiny_model(), lora=LORA)
    apply_finetune(tiny_model(), freeze_blocks=1)  # freezing alone needs no peft


@needs_peft
def test_benchmark_finetune_variants_and_their_ratios():
    from dataclasses import replace

    from tests.helpers import load_script

    bench = load_script("bench_model")
    case = replace(bench.CASES["finetune"], arch="deit_tiny_patch16_224", img_size=(32, 32))
    frozen, lora = bench.build_variant(case, "dcal-freeze"), bench.build_variant(case, "dcal-lora")
    assert frozen.freeze_blocks == 6 and not frozen.backbone.blocks[5].attn.qkv.weight.requires_grad
    assert lora.lora_settings.rank == bench.LORA_RANK and hasattr(lora.backbone.blocks[0].attn.qkv, "lora_A")
    variants = case.train_variants
    raw = {"train_s": {v: [t] for v, t in zip(variants, (2.0, 1.0, 1.5), strict=True)}, "infer_s": {},
           "memory": {v: {"train_peak_mb": m, "saved_mb": m, "trainable_params": n}
                      for v, m, n in zip(variants, (100.0, 40.0, 30.0), (1000, 500, 100), strict=True)}}
    flops = {"train": dict.fromkeys(variants, 1), "infer": {}}
    rows = {t["what"]: t["measured"] for t in bench.summarise(case, raw, flops)["targets"]}
    assert rows["memory: LoRA r=8 (backbone frozen) / full fine-tuning (peak)"] == 0.3
    assert rows["trainable parameters: first half of the blocks frozen / full fine-tuning"] == 0.5
    assert rows["train: first half of the blocks frozen / full fine-tuning"] == 0.5


# ------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("ft") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 1)):
        for c in ("a", "b", "c"):
            write_images(root / split / c, [f"{c}{i}.png" for i in range(n)], rng)
    recipe = root.parent / "recipe.yaml"
    recipe.write_text(f"data:\n  dataset: folder\n  root: {root}\n  resize: 40\ntrain:\n  batch_size: 6\n")
    return recipe


def _train(recipe, run, *extra):
    args = ["train", "--config", str(recipe), f"output_dir={run}", "model.img_size=32", *TINY_MODEL, *extra]
    assert main(args) == 0


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@needs_peft
def test_lora_run_resumes_then_loads_and_exports_merged(data_root, tmp_path, capsys):
    run = tmp_path / "lora"
    _train(data_root, run, "train.epochs=1", "model.lora.rank=2", "model.lora.targets=[qkv,fc2]")
    assert "LoRA rank 2 alpha 16 on qkv, fc2" in capsys.readouterr().out
    first = _state(run / "last.pth")
    assert "backbone.blocks.1.attn.qkv.lora_A.default.weight" in first
    _train(data_root, run, "train.epochs=2", "model.lora.rank=2", "model.lora.targets=[qkv,fc2]", "--resume")
    second = _state(run / "last.pth")
    for key in ("backbone.blocks.1.attn.qkv.base_layer.weight", "backbone.blocks.0.mlp.fc2.base_layer.weight",
                "backbone.pos_embed", "backbone.blocks.0.attn.proj.weight"):
        assert torch.equal(first[key], second[key]), key  # frozen through the resumed epoch
    assert not torch.equal(first["backbone.blocks.1.attn.qkv.lora_B.default.weight"],
                           second["backbone.blocks.1.attn.qkv.lora_B.default.weight"])
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["final"]

    from_pth = dcal.load_model(checkpoint=run / "last.pth", device="cpu")  # merged on load
    from_export = dcal.load_model(checkpoint=run / "last.safetensors", device="cpu")  # merged when written
    assert type(from_pth.model.backbone.blocks[1].attn.qkv) is nn.Linear
    assert getattr(from_export.model, "lora_settings", None) is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_pth.model.predict(x), from_export.model.predict(x), atol=1e-6, rtol=0)

    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dcal[onnx]')")
    assert main(["export", "--run", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "same_selection True" in capsys.readouterr().out


def test_freeze_blocks_run_keeps_frozen_weights_and_loads(data_root, tmp_path):
    run = tmp_path / "frozen"
    _train(data_root, run, "train.epochs=1", "model.freeze_blocks=1", "train.save_every=1")
    loaded = dcal.load_model(run=run, device="cpu")
    torch.manual_seed(0)  # train seeds 0 before building: the same initial weights
    init = dcal.create_model("deit_tiny_patch16_224", num_classes=3, img_size=32, depth=2, embed_dim=48,
                             num_heads=3, patch_size=8, pwca_blocks=2, drop_path_rate=0.1)
    got, want = loaded.model.state_dict(), init.state_dict()
    for key in ("backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.blocks.0.attn.qkv.weight"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(got["backbone.blocks.1.attn.qkv.weight"], want["backbone.blocks.1.attn.qkv.weight"])
