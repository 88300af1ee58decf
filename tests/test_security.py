"""A model file or a recipe is untrusted input: it never runs code, never makes dcal read another file or the
network, never asks for more memory than it holds, and bad values are refused in one line before any work."""

from __future__ import annotations

import pathlib
import resource
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dcal
from dcal.checkpoint import CheckpointMismatchError, export_weights
from dcal.cli import main
from dcal.config import TIMM_KWARGS, ConfigError, _float_keys, load_config, to_yaml
from dcal.engine import build_model
from dcal.loading import load_model
from tests.helpers import TINY_TIMM_KWARGS, tiny_model

TINY = ["data.dataset=synthetic", "model.img_size=32",
        TINY_TIMM_KWARGS, "model.pwca_blocks=2"]


class RunsCode:
    """Unpickling this touches ``marker``: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path(self.marker).touch, ()


@pytest.fixture(scope="module")
def tiny():
    """(config values as plain YAML data, model) of a 2-block, 48-dim model."""
    cfg = load_config(None, TINY)
    return yaml.safe_load(to_yaml(cfg)), build_model(cfg, 3)


def write_export(path: Path, model: torch.nn.Module, values: object) -> Path:
    export_weights(path, model, values if isinstance(values, str) else yaml.safe_dump(values))
    return path


def with_model(values: dict, **model_keys) -> dict:
    return {**values, "model": {**values["model"], **model_keys}}


def evil_pth(folder: Path) -> tuple[Path, Path]:
    """A ``.pth`` that creates ``marker`` when unpickled (as timm's checkpoint_path loading of timm <= 1.0.25 did)."""
    marker = folder / "code_ran"
    path = folder / "evil.pth"
    torch.save({"state_dict": RunsCode(marker)}, path)
    return path, marker


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_crafted_pth_does_run_code_when_unpickled(tmp_path):
    """The payload the other tests use is live: plain unpickling creates the marker."""
    path, marker = evil_pth(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_sound_export_loads(tmp_path, tiny):
    values, model = tiny
    loaded = load_model(checkpoint=write_export(tmp_path / "ok.safetensors", model, values)).model
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


LOADING_KWARGS = {
    "checkpoint_path": lambda evil: str(evil),
    "pretrained_cfg_overlay": lambda evil: {"file": str(evil)},
    "pretrained_cfg": lambda evil: {"file": str(evil)},
    "cache_dir": lambda evil: str(evil.parent),
}


@pytest.mark.parametrize("key", list(LOADING_KWARGS))
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_stored_config_cannot_make_timm_load_a_file(tmp_path, tiny, capsys, key, fmt):
    values, model = tiny
    evil, marker = evil_pth(tmp_path)
    stored = with_model(values, timm_kwargs={**values["model"]["timm_kwargs"], key: LOADING_KWARGS[key](evil)})
    path = tmp_path / f"crafted.{fmt}"
    if fmt == "safetensors":
        write_export(path, model, stored)
    else:
        torch.save({"model": model.state_dict(), "config": yaml.safe_dump(stored)}, path)
    want = f"model.timm_kwargs.{key}' is not an allowed timm argument"
    with pytest.raises(ConfigError, match=want):
        dcal.load_model(checkpoint=path)
    with pytest.raises(ConfigError, match=want):
        load_model(checkpoint=path)
    for argv in (["eval", "--checkpoint", str(path)], ["predict", "--checkpoint", str(path), str(tmp_path)]):
        err = one_line_error(capsys, argv)
        assert str(path) in err and want in err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["hf-hub:timm/deit_tiny_patch16_224", "local-dir:/tmp/models", "/tmp/deit.pth",
                                  "../deit_tiny_patch16_224", "deit_tiny_patch16_224.a.b", "Deit Tiny"])
def test_backbone_must_be_a_plain_timm_name(tmp_path, tiny, capsys, name):
    values, model = tiny
    path = write_export(tmp_path / "crafted.safetensors", model, with_model(values, backbone=name))
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path)])
    assert "'model.backbone' must be a timm model name" in err and str(path) in err
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, [f"model.backbone={name}"])


def test_stored_pretrained_keys_are_never_acted_on(tmp_path, tiny, monkeypatch):
    """A checkpoint's model.pretrained / pretrained_file (e.g. pointing at a malicious file) are ignored: the
    weights come from the checkpoint, nothing else is read or downloaded."""
    values, model = tiny
    evil, marker = evil_pth(tmp_path)
    import timm

    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for stored in (with_model(values, pretrained=True), with_model(values, pretrained_file=str(evil))):
        path = write_export(tmp_path / "pretrained.safetensors", model, stored)
        run = load_model(checkpoint=path, overrides=["model.pretrained=true"])
        assert not run.cfg.model.pretrained and run.cfg.model.pretrained_file is None
        torch.testing.assert_close(run.model.state_dict(), model.state_dict())
    assert calls and not any(kw.get("pretrained") for kw in calls)
    assert not marker.exists()


def test_a_recipe_cannot_make_timm_load_a_file(tmp_path, capsys):
    evil, marker = evil_pth(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  dataset: synthetic\nmodel:\n  img_size: 32\n"
                      f"  timm_kwargs: {{depth: 2, embed_dim: 48, num_heads: 3, checkpoint_path: {evil}}}\n")
    err = one_line_error(capsys, ["train", "--config", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert "model.timm_kwargs.checkpoint_path" in err and "depth, embed_dim" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="checkpoint_path"):  # the Python API refuses it too
        dcal.create_model("deit_tiny_patch16_224", num_classes=2, checkpoint_path=str(evil), depth=1, pwca_blocks=1)
    assert not marker.exists()


def test_timm_kwargs_typo_suggests_the_key():
    with pytest.raises(ConfigError, match=r"'model\.timm_kwargs\.embed_dims'.*did you mean 'embed_dim'"):
        load_config(None, ["model.timm_kwargs={depth: 2, embed_dims: 48}"])


@pytest.mark.parametrize("kwargs, match", [
    ("{depth: 0}", r"depth' must be in \[1, 128\]"),
    ("{depth: 100000}", r"depth' must be in"),
    ("{qkv_bias: 1}", "qkv_bias' expects true or false"),
    ("{depth: 2.5}", "depth' expects int"),
    ("{mlp_ratio: .nan}", "mlp_ratio' must be in"),
    ("{num_heads: true}", "num_heads' expects int"),
    ("{img_size: 64}", "use model.img_size"),
    ("{dynamic_img_size: true}", "dynamic_img_size' is not an allowed timm argument"),
    ("{global_pool: max}", r"global_pool' must be one of \['token', 'avg', 'map'\]"),
    ("{reg_tokens: 65}", r"reg_tokens' must be in \[0, 64\]"),
    ("{embed_dim: 50, num_heads: 3}", r"embed_dim' \(50\) must be divisible by num_heads \(3\)"),
])
def test_timm_kwargs_types_and_ranges(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"model.timm_kwargs={kwargs}"])


def test_every_allowed_timm_kwarg_builds_a_model():
    """The allow-list names only arguments timm's VisionTransformer (or, for its registers, Eva) takes and DCAL
    runs with."""
    values = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "mlp_ratio": 2.0, "qkv_bias": False,
              "qk_norm": True, "proj_bias": False, "scale_attn_norm": True, "scale_mlp_norm": True,
              "init_values": 1e-5, "no_embed_class": True, "pre_norm": True, "final_norm": True, "fc_norm": None,
              "drop_rate": 0.1, "pos_drop_rate": 0.1, "proj_drop_rate": 0.1, "attn_drop_rate": 0.1,
              "class_token": True, "reg_tokens": 2, "global_pool": "avg"}
    eva = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "num_reg_tokens": 2}
    assert set(values) | set(eva) == set(TIMM_KWARGS)
    for backbone, kwargs in (("deit_tiny_patch16_224", values), ("eva02_tiny_patch14_224", eva)):
        cfg = load_config(None, ["model.img_size=32", "model.pwca_blocks=1", f"model.backbone={backbone}",
                                 "model.timm_kwargs=" + yaml.safe_dump(kwargs, default_flow_style=True).strip()])
        model = build_model(cfg, 3).train()
        out = model(torch.randn(2, 3, 32, 32))
        assert set(out["logits"]) == {"sa", "glca", "pwca"}


def test_a_small_file_cannot_ask_for_a_large_model(tmp_path, tiny, monkeypatch):
    """A stored config of a 48-block, 4096-wide ViT (~10 G parameters, ~40 GB) with the tiny model's tensors: the
    model is built on the meta device only, compared with the file's shapes and refused; no real build happens."""
    values, model = tiny
    bomb = with_model(values, timm_kwargs={"depth": 48, "embed_dim": 4096, "num_heads": 32, "patch_size": 8})
    path = write_export(tmp_path / "bomb.safetensors", model, bomb)
    assert path.stat().st_size < 2 << 20
    import dcal.loading as build  # load_model builds through it

    devices = []

    def recording_build(cfg, num_classes):
        built = build_model(cfg, num_classes)
        devices.append(next(built.parameters()).device.type)
        return built

    monkeypatch.setattr(build, "build_model", recording_build)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(CheckpointMismatchError, match=r"bomb\.safetensors' does not fit.*shape mismatch"):
        load_model(checkpoint=path)
    assert devices == ["meta"]
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024 < 200 << 20  # ru_maxrss: KiB on Linux
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------------------------------------------ YAML
def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\ndata:\n  root: *a{levels - 1}\n"


@pytest.mark.parametrize("text, match", [
    (alias_bomb(), "anchors and aliases"),
    ("model: &m {glca_blocks: 1}\n", "anchors and aliases"),
    ("train:\n  epochs: 3\ntrain:\n  batch_size: 4\n", r"duplicate key 'train' \(line 3"),
    ("train:\n  epochs: 3\n  epochs: 4\n", "duplicate key 'epochs'"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- data\n- model\n", "holds a YAML list"),
    ("42\n", "holds a YAML int"),
    ("model: {backbone: '${oc.env:HOME}'}\n", r"'model\.backbone' is '\$\{oc\.env:HOME\}'.*interpolation"),
    ("data: {root: '/data/${oc.env:USER}/cub'}\n", r"'data\.root'.*interpolation"),
    ("data: {mean: [0.5, '${data.hflip}', 0.5]}\n", r"'data\.mean\[1\]'.*interpolation"),
    ("model: {backbone: '???'}\n", r"'model\.backbone' is '\?\?\?'"),
])
def test_bad_yaml_is_refused_in_one_line(tmp_path, capsys, text, match):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as info:
        load_config(recipe)
    assert time.perf_counter() - start < 1.0
    assert str(recipe) in str(info.value) and "\n" not in str(info.value)
    err = one_line_error(capsys, ["train", "--config", str(recipe), f"output_dir={tmp_path / 'run'}"])
    assert str(recipe) in err


@pytest.mark.parametrize("text, match", [
    (alias_bomb(), "anchors and aliases"),
    ("train:\n  epochs: 3\ntrain:\n  batch_size: 4\n", "duplicate key 'train'"),
    ("", "is empty"),
    ("- data\n- model\n", "holds a YAML list"),
    ("just a string\n", "holds a YAML str"),
    ("data: {root: '${oc.env:HOME}'}\n", r"'data\.root'.*interpolation"),
])
def test_bad_stored_config_is_refused_in_one_line(tmp_path, tiny, capsys, text, match):
    path = write_export(tmp_path / "stored.safetensors", tiny[1], text)
    with pytest.raises(ConfigError, match=match):
        load_model(checkpoint=path)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path)])
    assert str(path) in err


def test_interpolation_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"the overrides: config key 'data\.root'.*interpolation"):
        load_config(None, ["data.root=${oc.env:HOME}"])


# ------------------------------------------------------------------------------------------------- numbers
def bad_value(key: str, value: str) -> str:
    return f"[{value}, 0.5, 0.5]" if key in ("data.mean", "data.std", "loss.fixed_weights") else value


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_non_finite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, [f"{key}={bad_value(key, value)}"])


def test_every_float_key_is_checked():
    assert {"train.lr", "train.weight_decay", "train.clip_grad", "train.step_gamma", "train.min_lr",
            "train.warmup_lr", "loss.label_smoothing", "loss.fixed_weights", "model.top_r"} <= set(_float_keys())


@pytest.mark.parametrize("override, key", [
    ("train.step_gamma=0", "train.step_gamma"),
    ("train.step_gamma=-0.5", "train.step_gamma"),
    ("loss.fixed_weights=[1,-1,1]", "loss.fixed_weights"),
    ("loss.fixed_weights=[0,0,0]", "loss.fixed_weights"),
    ("loss.triplet_margin=-1", "loss.triplet_margin"),
    ("eval.max_rank=0", "eval.max_rank"),
    ("data.num_classes=1", "data.num_classes"),
    ("train.seed=-1", "train.seed"),
    ("train.step_epochs=[-1]", "train.step_epochs"),
    ("model.glca_blocks=1000", "model.glca_blocks"),
    ("model.img_size=100000", "model.img_size"),
    ("data.synthetic_image_size=8", "data.synthetic_image_size"),
])
def test_out_of_range_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, ["data.dataset=synthetic", "data.resize=null", override])


def test_a_synthetic_set_too_large_for_memory_is_refused():
    with pytest.raises(ConfigError, match="GiB generated set"):
        load_config(None, ["data.dataset=synthetic", "data.synthetic_image_size=1024",
                           "data.synthetic_train_per_class=100000"])


@pytest.mark.parametrize("argv", [["search", "--query", "q", "--gallery", "g", "--max-rank", "0"],
                                  ["visualize", "--checkpoint", "x.pth", "--num-images", "0"]])
def test_cli_counts_must_be_at_least_one(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "expects an int >= 1, got '0'" in capsys.readouterr().err


def test_a_one_class_training_set_is_refused(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "only").mkdir(parents=True)
        for i in range(4):
            from PIL import Image

            Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(root / split / "only" / f"{i}.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{dataset: folder, root: {root}, resize: 40}}\nmodel: {{img_size: 32}}\n")
    err = one_line_error(capsys, ["train", "--config", str(recipe), f"output_dir={tmp_path / 'run'}",
                                  "train.workers=0"])
    assert f"training set in {root} has 1 class(es)" in err


# --------------------------------------------------------------------------------------- damaged model files
def damaged(tmp_path: Path, model: torch.nn.Module, values: dict, kind: str) -> Path:
    if kind == "zero.pth":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "truncated.pth":
        full = tmp_path / "full.pth"
        torch.save({"model": model.state_dict(), "config": yaml.safe_dump(values)}, full)
        (tmp_path / kind).write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif kind == "garbage.pth":
        (tmp_path / kind).write_bytes(b"this is not a checkpoint at all\n" * 4)
    elif kind == "tensors_missing.pth":
        torch.save({"model": {"x": 3}, "config": yaml.safe_dump(values)}, tmp_path / kind)
    elif kind == "garbage.safetensors":
        (tmp_path / kind).write_bytes(b"not a safetensors file")
    elif kind == "zero.safetensors":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "truncated.safetensors":
        full = write_export(tmp_path / "full.safetensors", model, values)
        (tmp_path / kind).write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return tmp_path / kind


@pytest.mark.parametrize("kind, match", [
    ("zero.pth", "is truncated or not a PyTorch checkpoint"),
    ("truncated.pth", "is truncated or not a PyTorch checkpoint"),
    ("garbage.pth", "is truncated or not a PyTorch checkpoint"),
    ("tensors_missing.pth", "'model' must map names to tensors"),
    ("garbage.safetensors", "is truncated or not a safetensors file"),
    ("zero.safetensors", "is truncated or not a safetensors file"),
    ("truncated.safetensors", "is truncated or not a safetensors file"),
])
def test_damaged_model_files_get_one_line(tmp_path, tiny, capsys, kind, match):
    path = damaged(tmp_path, tiny[1], tiny[0], kind)
    for argv in (["eval", "--checkpoint", str(path)], ["predict", "--checkpoint", str(path), str(tmp_path)]):
        err = one_line_error(capsys, argv)
        assert str(path) in err and match in err


def test_a_compressed_pth_cannot_expand_beyond_its_size(tmp_path, tiny, capsys):
    """torch.load inflates deflated zip entries: 40 MB of zeros in a ~50 kB file. torch.save never compresses,
    so such a file is refused before torch.load, as a checkpoint and as a pretrained_file."""
    values, model = tiny
    plain, path = tmp_path / "plain.pth", tmp_path / "deflated.pth"
    torch.save({"model": {**model.state_dict(), "pad": torch.zeros(10_000_000)}, "config": yaml.safe_dump(values)},
               plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for entry in src.infolist():
            out.writestr(entry.filename, src.read(entry.filename))
    assert path.stat().st_size < 1 << 20
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path)])
    assert str(path) in err and "holds compressed entries" in err
    with pytest.raises(ValueError, match=r"pretrained_file '.*deflated\.pth' holds compressed entries"):
        tiny_model(num_classes=3, pretrained_file=path)


def test_a_pth_with_code_is_refused_naming_weights_only(tmp_path, capsys):
    path, marker = evil_pth(tmp_path)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path)])
    assert "holds pickled objects other than tensors" in err and "weights_only" in err and str(path) in err
    assert not marker.exists()


def test_pretrained_file_of_another_width_is_one_line(tmp_path):
    other = tiny_model(num_classes=3, embed_dim=32, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save(other.backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pth' does not match the backbone") as info:
        tiny_model(num_classes=3, pretrained_file=path)
    assert "\n" not in str(info.value)


def test_npz_pretrained_file_never_unpickles(tmp_path):
    """``.npz`` files go through numpy with allow_pickle=False: an object array (or a pickle named .npz) is
    refused and its code never runs."""
    marker = tmp_path / "code_ran"
    archive = tmp_path / "evil.npz"
    np.savez(archive, **{"embedding/kernel": np.array([RunsCode(marker)], dtype=object)})
    plain = tmp_path / "pickle.npz"
    torch.save(RunsCode(marker), plain)  # not a zip: numpy would need allow_pickle to read it
    for path in (archive, plain):
        with pytest.raises(ValueError, match=rf"{path.name}'") as info:
            tiny_model(num_classes=3, depth=1, pretrained_file=path)
        assert "\n" not in str(info.value)
    assert not marker.exists()
