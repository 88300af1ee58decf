"""A dataset is one reader plus one registration (docs/design.md, "Adding a dataset"): a reader registered here,
in the test, is a ``data.dataset`` the config accepts and the engine builds, with no other file touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dcal.config import ConfigError, dataset_kwargs, load_config
from dcal.data import DATASETS, build_dataset, dataset_names, register_dataset, task_of
from dcal.data.fgvc import FGVCDataset


@pytest.fixture
def tiny(tmp_path: Path):
    """A registered FGVC reader of ``root/<split>/<class>_<i>.png`` files, removed from the registry after."""
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        for c in ("gull", "tern"):
            for i in range(n):
                colour = (40 * i, 90, 200 if c == "gull" else 20)
                Image.new("RGB", (40, 40), colour).save(tmp_path / split / f"{c}_{i}.png")
    calls = []

    @register_dataset("tiny_test_set", task="fgvc", options={"scale": None})
    def read_tiny(root, split, transform=None, scale: int = 1) -> FGVCDataset:
        calls.append((split, scale))
        paths = sorted(str(p) for p in (Path(root) / split).iterdir())
        classes = ["gull", "tern"]
        targets = [classes.index(Path(p).name.split("_")[0]) for p in paths]
        return FGVCDataset("tiny_test_set", split, paths, targets, classes, transform, str(root))

    yield tmp_path, calls
    del DATASETS["tiny_test_set"]


def test_a_registered_reader_is_accepted_by_the_config_and_built(tiny):
    from dcal.engine import build_datasets

    root, calls = tiny
    assert "tiny_test_set" in dataset_names("fgvc") and task_of("tiny_test_set") == "fgvc"
    cfg = load_config(None, ["data.dataset=tiny_test_set", f"data.root={root}", "model.img_size=32",
                             "data.resize=36"])
    assert cfg.task == "fgvc" and cfg.model.top_r == 0.1  # the task, hence the paper's R, from the registration
    assert dataset_kwargs(cfg) == {}  # an option of the Python API only is not read from the config
    sets = build_datasets(cfg)
    assert set(sets) == {"train", "test"} and calls == [("test", 1), ("train", 1)]
    assert len(sets["train"]) == 6 and len(sets["test"]) == 4 and sets["train"].classes == ["gull", "tern"]
    image, target = sets["train"][3]
    assert tuple(image.shape) == (3, 32, 32) and target == 1
    assert build_dataset("tiny_test_set", root, "test", scale=2).num_classes == 2 and calls[-1] == ("test", 2)


def test_the_registry_checks_names_splits_and_options(tiny):
    root, _ = tiny
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("tiny_test_set", "fgvc", lambda *a: None)
    with pytest.raises(ValueError, match="task must be one of"):
        register_dataset("other", "detection", lambda *a: None)
    with pytest.raises(ValueError, match=r"tiny_test_set: unknown split 'query'"):
        build_dataset("tiny_test_set", root, "query")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['level'\]; accepted: \['scale'\]"):
        build_dataset("tiny_test_set", root, "train", level=1)
    with pytest.raises(ConfigError, match=r"data\.dataset.*unknown dataset 'tiny'.*tiny_test_set"):
        load_config(None, ["data.dataset=tiny"])


def test_the_built_in_datasets_are_registered_by_task():
    assert dataset_names("fgvc") == ("cub", "cars", "aircraft", "folder", "synthetic")
    assert dataset_names("reid") == ("market1501", "dukemtmc", "msmt17", "veri", "reid_folder")
    for name, entry in DATASETS.items():
        assert callable(entry.load_reader()), name
        # every option the config sets is a data.* key of the schema
        for key in filter(None, entry.options.values()):
            load_config(None, [f"data.dataset={name}"]).data[key]  # noqa: B018 (raises when the key is missing)
