"""Config loading, validation, derived values and the paper's recipe files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dcal.config import ConfigError, dataset_kwargs, load_config, save_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
FGVC_YAML = sorted((CONFIGS / "fgvc").glob("*.yaml"))
REID_YAML = sorted((CONFIGS / "reid").glob("*.yaml"))


def _generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_recipe_files_cover_tables_1_and_2() -> None:
    fgvc = {p.stem for p in FGVC_YAML}
    reid = {p.stem for p in REID_YAML}
    backbones = ["deit_tiny", "deit_small", "deit_base", "vit_base"]
    modern = ["dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov3_vits16", "dinov3_vitb16", "eva02_s14", "eva02_b14"]
    assert fgvc == ({f"{d}_{b}" for d in ("cub", "cars", "aircraft") for b in backbones + ["r50_vit_base"]}
                    | {f"cub_{b}" for b in modern})
    reid_datasets = ("market1501", "dukemtmc", "msmt17", "veri")
    stride12 = {f"{d}_{b}_stride12" for d in reid_datasets for b in ("deit_base", "vit_base")}  # docs/design.md
    assert reid == ({f"{d}_{b}" for d in reid_datasets for b in backbones} | stride12
                    | {f"msmt17_{b}" for b in modern})
    assert (CONFIGS / "demo.yaml").is_file()


def test_committed_files_match_the_generator() -> None:
    gen = _generator()
    for path in FGVC_YAML:
        dataset, backbone = path.stem.split("_", 1)
        assert path.read_text() == gen.fgvc_recipe(dataset, backbone), path
    for path in REID_YAML:
        dataset, backbone = path.stem.split("_", 1)
        stride = 12 if backbone.endswith("_stride12") else None
        assert path.read_text() == gen.reid_recipe(dataset, backbone.removesuffix("_stride12"), stride), path
    for stage in ("demo_pretrain", "demo"):
        assert (CONFIGS / f"{stage}.yaml").read_text() == gen.demo_recipe(stage), stage


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    by_folder = {"fgvc": "fgvc", "reid": "reid"}
    by_file = {"demo": "fgvc", "cub100_small_vit": "fgvc", "mars_mini_small_vit": "reid", "cub51_100_pretrain": "fgvc",
               "cub1_50_finetune": "fgvc", "mars_mini_finetune": "reid", "demo_pretrain": "fgvc",
               "cub1_50_long": "fgvc", "mars_mini_long": "reid", "demo_long": "fgvc", "cub1_50_long_pk": "fgvc"}
    assert cfg.task == by_folder.get(path.parent.name, by_file.get(path.stem))
    assert cfg.train.lr > 0 and 0 < cfg.model.top_r <= 1
    if path.parent.name == "fgvc":
        assert cfg.train.lr == pytest.approx(5e-4 / 512 * 16)  # derived from lr: null


@pytest.mark.parametrize("path", FGVC_YAML, ids=lambda p: p.stem)
def test_fgvc_recipe_values(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    # every §4.1 value is written in the file itself, not left to code defaults
    assert raw["train"]["optimizer"] == "adamw" and raw["train"]["weight_decay"] == 0.05
    assert raw["train"]["lr"] is None and raw["train"]["base_lr"] == 5e-4
    assert "5e-4 / 512" in path.read_text()  # the lr formula stays visible
    assert raw["train"]["scheduler"] == "cosine" and raw["train"]["epochs"] == 100
    assert raw["train"]["batch_size"] == 16
    assert raw["model"]["drop_path_rate"] == 0.1 and raw["model"]["top_r"] == 0.1
    assert raw["model"]["glca_blocks"] == 1 and raw["model"]["pwca_blocks"] == 12
    assert raw["data"]["resize"] == 550 and raw["model"]["img_size"] == 448
    assert raw["model"]["pretrained"] is True


@pytest.mark.parametrize("path", REID_YAML, ids=lambda p: p.stem)
def test_reid_recipe_values(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    t, m, d = raw["train"], raw["model"], raw["data"]
    assert t["optimizer"] == "sgd" and t["momentum"] == 0.9 and t["weight_decay"] == 1e-4
    assert t["lr"] == 0.008 and t["scheduler"] == "cosine" and t["epochs"] == 120
    assert t["batch_size"] == 64 and t["num_instances"] == 4
    assert m["top_r"] == 0.3 and m["glca_blocks"] == 1 and m["pwca_blocks"] == 12 and m["pretrained"] is True
    patch14 = "patch14" in m["backbone"]  # the paper's size cut to whole 14-pixel patches
    assert m["img_size"] == ([256, 256] if d["dataset"] == "veri" else [252, 126] if patch14 else [256, 128])
    assert m["glca_pool"] == "mean"
    assert m["patch_stride"] == (12 if path.stem.endswith("_stride12") else None)
    assert d["hflip"] == 0.5 and d["pad"] == 10 and d["random_erasing"] == 0.5


def test_backbone_names() -> None:
    expected = {
        "deit_tiny": "deit_tiny_patch16_224",
        "deit_small": "deit_small_patch16_224",
        "deit_base": "deit_base_patch16_224",
        "vit_base": "vit_base_patch16_224.augreg_in21k",
        "r50_vit_base": "vit_base_r50_s16_224.orig_in21k",
        "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
        "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
        "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
        "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
        "eva02_s14": "eva02_small_patch14_336.mim_in22k_ft_in1k",
        "eva02_b14": "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k",
    }
    for path in FGVC_YAML + REID_YAML:
        backbone = path.stem.split("_", 1)[1].removesuffix("_stride12")
        assert yaml.safe_load(path.read_text())["model"]["backbone"] == expected[backbone]


def test_unknown_key_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lr_rate' \(did you mean 'train\.lr'\?\)"):
        load_config(None, ["train.lr_rate=0.1"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"'model\.glca_block'.*did you mean 'model\.glca_blocks'"):
        load_config(None, ["model.glca_block=2"])


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: cub\n  rezise: 550\n")
    with pytest.raises(ConfigError, match=r"'data\.rezise'.*did you mean 'data\.resize'"):
        load_config(path)


def test_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"config key 'train\.epochs' expects int, got 'abc'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"'train\.lr' expects float or null"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"'model\.img_size'"):
        load_config(None, ["model.img_size=[256,128,3]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_choices_and_ranges_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'train\.optimizer' must be one of adamw, sgd; got 'adam'"):
        load_config(None, ["train.optimizer=adam"])
    with pytest.raises(ConfigError, match=r"'train\.amp'"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match=r"'data\.dataset'"):
        load_config(None, ["data.dataset=imagenet"])
    with pytest.raises(ConfigError, match=r"'model\.top_r'"):
        load_config(None, ["model.top_r=1.5"])
    with pytest.raises(ConfigError, match=r"'train\.num_instances'"):
        load_config(None, ["data.dataset=market1501", "data.resize=null", "train.batch_size=30"])
    with pytest.raises(ConfigError, match=r"'task'"):
        load_config(None, ["data.dataset=market1501", "task=fgvc"])
    # P x K batches: always for Re-ID, for FGVC on request (train.sampler=pk); K must divide the batch then only
    with pytest.raises(ConfigError, match=r"'train\.sampler' must be one of auto, shuffle, pk"):
        load_config(None, ["train.sampler=balanced"])
    with pytest.raises(ConfigError, match=r"'train\.sampler'.*triplet loss"):
        load_config(None, ["data.dataset=market1501", "data.resize=null", "train.sampler=shuffle"])
    with pytest.raises(ConfigError, match=r"'train\.num_instances'.*P classes x K"):
        load_config(None, ["train.sampler=pk", "train.batch_size=30"])
    assert load_config(None, ["train.batch_size=30"]).train.num_instances == 4  # shuffled FGVC batches: unused


def test_overrides_and_derived_values() -> None:
    cfg = load_config(None, ["train.batch_size=16"])
    assert cfg.task == "fgvc" and cfg.train.lr == pytest.approx(5e-4 / 512 * 16)
    assert cfg.model.top_r == 0.1
    cfg = load_config(None, ["train.batch_size=64", "train.base_lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3 * 64 / 512)
    cfg = load_config(None, ["train.lr=0.01", "model.top_r=0.2"])  # explicit values win
    assert cfg.train.lr == 0.01 and cfg.model.top_r == 0.2
    cfg = load_config(None, ["data.dataset=veri", "model.img_size=[256,256]", "data.resize=null"])
    assert cfg.task == "reid" and cfg.model.top_r == 0.3 and cfg.train.lr == 0.008
    assert list(cfg.model.img_size) == [256, 256] and cfg.data.resize is None
    recipe = load_config(CONFIGS / "fgvc" / "cub_deit_tiny.yaml", ["data.root=/data/birds", "train.epochs=2"])
    assert recipe.data.root == "/data/birds" and recipe.train.epochs == 2 and recipe.model.pretrained


def test_save_and_reload(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "reid" / "market1501_deit_small.yaml", ["train.epochs=3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert to_yaml(again) == to_yaml(cfg)
    assert "train.base_lr * train.batch_size / 512" in path.read_text()


def test_dataset_kwargs_and_demo() -> None:
    cfg = load_config(CONFIGS / "demo.yaml")
    kw = dataset_kwargs(cfg)
    assert cfg.data.dataset == "synthetic" and kw["image_size"] == cfg.data.synthetic_image_size
    assert dataset_kwargs(load_config(None, ["data.dataset=aircraft"])) == {"annotation_level": "variant"}
    assert dataset_kwargs(load_config(None)) == {}
    msmt = load_config(CONFIGS / "reid" / "msmt17_deit_tiny.yaml")
    assert dataset_kwargs(msmt) == {"val_in_train": True}
    assert cfg.model.timm_kwargs["depth"] == cfg.model.pwca_blocks  # T = all blocks of the small ViT


def test_the_demo_runs_the_packaged_recipes() -> None:
    """One demo recipe: `dcal demo`'s stages are configs/demo_pretrain.yaml and configs/demo.yaml loaded by name,
    except where the runs go and that the fine-tuning names the demo's pretrained run folder."""
    from dcal.demo import demo_config, demo_pretrain_config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "timm_kwargs":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    ignored = {"output_dir", "model.pretrain", "model.pretrained_file"}
    for stage, embedded_cfg in (("demo_pretrain", demo_pretrain_config("runs/demo")),
                                ("demo", demo_config("runs/demo", "dcal"))):
        recipe = flat(OmegaConf.to_container(load_config(stage)))
        embedded = flat(OmegaConf.to_container(embedded_cfg))
        assert {k for k in recipe if recipe[k] != embedded[k]} <= ignored, stage
    assert demo_config("runs/demo", "dcal").model.pretrained_file == "runs/demo/pretrain"
    assert load_config(CONFIGS / "demo.yaml").model.pretrain == "configs/demo_pretrain.yaml"


MODERN_YAML = [p for p in FGVC_YAML + REID_YAML if p.stem.split("_", 1)[1] in _generator().MODERN_BACKBONES]


@pytest.mark.parametrize("path", MODERN_YAML, ids=lambda p: p.stem)
def test_modern_backbone_recipes_build_and_run(path: Path) -> None:
    """Each recipe for a register / rotary backbone builds (its architecture, 2 blocks deep, random weights: no
    download here) and runs DCAL at the recipe's input size; the Table 3 runner finds its depth."""
    import warnings

    import torch

    from dcal.ablation import backbone_depth
    from dcal.engine.build import build_model

    cfg = load_config(path)
    assert backbone_depth(cfg) == 12
    small = load_config(path, ["model.pretrained=false", "model.timm_kwargs.depth=2", "model.pwca_blocks=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DINOv3's dynamic_img_size notice
        model = build_model(small, 5).eval()
    h, w = (small.model.img_size, small.model.img_size) if isinstance(small.model.img_size, int) \
        else small.model.img_size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    patch = 14 if "patch14" in small.model.backbone else 16
    assert model.num_patches == (h // patch) * (w // patch) and h % patch == 0 and w % patch == 0
    assert out["selected"].shape == (1, model.num_local_queries)
def test_recipes_resolve_by_name_from_the_package(tmp_path, monkeypatch):
    from dcal.config import RECIPES, ConfigError, load_config, recipe_names, resolve_recipe

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    # the package's recipes are the checkout's configs/ (a link: one copy in git), every one of them
    assert RECIPES.resolve() == repo_configs.resolve()
    assert recipe_names() == sorted(p.relative_to(repo_configs).with_suffix("").as_posix()
                                    for p in repo_configs.rglob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # away from the checkout: names still resolve, to the packaged files
    want = RECIPES / "fgvc" / "cub_deit_tiny.yaml"
    for name in ("fgvc/cub_deit_tiny", "fgvc/cub_deit_tiny.yaml", "configs/fgvc/cub_deit_tiny.yaml"):
        assert resolve_recipe(name) == want, name
    assert load_config("fgvc/cub_deit_tiny").model.backbone == load_config(want).model.backbone
    own = tmp_path / "fgvc" / "cub_deit_tiny.yaml"  # an existing file wins over a packaged name
    own.parent.mkdir()
    own.write_text("train:\n  epochs: 3\n")
    assert resolve_recipe("fgvc/cub_deit_tiny.yaml") == Path("fgvc/cub_deit_tiny.yaml")
    with pytest.raises(ConfigError, match=r"not found: fgvc/cub_deit_tny: .*did you mean fgvc/cub_deit_tiny"):
        load_config("fgvc/cub_deit_tny")
    # a recipe's model.pretrain (configs/demo_pretrain.yaml) resolves the same way, outside the checkout too
    from dcal.pretrain import pretrain_config

    pre = pretrain_config(load_config("demo").model.pretrain, tmp_path / "pre")
    assert pre.data.synthetic_task == "coarse" and pre.output_dir == str(tmp_path / "pre")


def test_validate_reads_as_a_schema_one_check_per_section():
    """config.validate is the choices, finiteness, then one check per section, each written beside its dataclass
    (in the order of RunConfig's sections), so that a key's constraints are found next to the key."""
    import dataclasses
    import inspect

    from dcal import config

    sections = [f.type if isinstance(f.type, type) else getattr(config, str(f.type))
                for f in dataclasses.fields(config.RunConfig) if f.name in ("data", "model", "loss", "train", "eval")]
    assert [c.__name__ for c in config.SECTION_CHECKS] == [f"_check_{s.__name__[:-6].lower()}" for s in sections]
    lines, _ = inspect.getsourcelines(config)
    source = "".join(lines)
    for section, check in zip(sections, config.SECTION_CHECKS, strict=True):
        # the check follows its dataclass directly
        after = source[source.index(f"class {section.__name__}:"):]
        assert after.index(f"def {check.__name__}(") < after.index("@dataclass"), check.__name__
