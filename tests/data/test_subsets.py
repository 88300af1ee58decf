"""Class / identity subsets and merged splits (``data.classes``, ``data.identities``, ``data.train_splits``)."""

from __future__ import annotations

import numpy as np
import pytest

from dcal.config import ConfigError, load_config
from dcal.data import build_dataset
from dcal.data.layout import DatasetFormatError
from dcal.data.subsets import parse_selection, select_classes
from dcal.engine.build import build_datasets
from tests.helpers import SHARED_DATA, needs_shared

CUB = ["data.dataset=cub", f"data.root={SHARED_DATA / 'cub100'}", "model.img_size=64", "data.resize=72"]


@pytest.mark.parametrize("spec, expected", [
    ("1-3", [1, 2, 3]), ("2", [2]), ("1-2,5, 7-8", [1, 2, 5, 7, 8]), ([3, "b", 3], [3, "b"]), ("4-4", [4]),
])
def test_parse_selection(spec, expected):
    assert parse_selection(spec, "k") == expected


@pytest.mark.parametrize("spec", ["3-1", "a-b", "", [], [True], [1.5], 7, None])
def test_parse_selection_refuses(spec):
    with pytest.raises(ValueError, match="^k: "):
        parse_selection(spec, "k")


def test_synthetic_subset_keeps_each_image():
    full = build_dataset("synthetic", None, "train", num_classes=4, train_per_class=3)
    sub = select_classes(full, "2-3")
    assert sub.classes == full.classes[1:3] and sub.class_ids == [2, 3]
    assert sorted(set(sub.targets)) == [0, 1]
    for i, path in enumerate(sub.paths):  # the image of each kept sample is the one the full set had for it
        j = full.paths.index(path)
        assert full.targets[j] == sub.targets[i] + 1
        assert np.array_equal(np.asarray(sub.load_image(i)), np.asarray(full.load_image(j)))
        assert sub.mark_boxes[i] == full.mark_boxes[j]


def test_a_huge_range_is_refused_before_it_is_expanded():
    # hostile input: a stored config or recipe must not make dcal build a list of billions of ids
    with pytest.raises(ValueError, match="selects more than 1,000,000 ids"):
        parse_selection("1-999999999999", "k")
    with pytest.raises(ConfigError, match="data.classes"):
        load_config(None, ["data.classes=5-4000000000"])


@needs_shared
def test_cub_class_split_is_disjoint_and_reindexed():
    ft = build_datasets(load_config(None, [*CUB, "data.classes=1-50"]))
    pre = build_datasets(load_config(None, [*CUB, "data.classes=51-100", "data.train_splits=[train,test]"]))
    assert ft["train"].num_classes == ft["test"].num_classes == pre["train"].num_classes == 50
    assert ft["train"].classes[0].startswith("001.") and pre["train"].classes[0].startswith("051.")
    assert ft["train"].classes == ft["test"].classes
    assert set(ft["train"].targets) == set(range(50))
    # pretraining sees every image of species 51-100 and none of 1-50; the fine-tuning splits stay official
    assert not set(pre["train"].paths) & (set(ft["train"].paths) | set(ft["test"].paths))
    assert len(pre["train"]) == len(pre["test"]) + len(
        build_datasets(load_config(None, [*CUB, "data.classes=51-100"]))["train"])
    assert not set(ft["train"].paths) & set(ft["test"].paths)
    # names select the same classes as ids; the targets point at the right names
    named = build_datasets(load_config(None, [*CUB, f"data.classes=[{ft['train'].classes[4]!r}, 1]"]))["test"]
    assert named.classes == [ft["train"].classes[0], ft["train"].classes[4]]
    for path, t in zip(named.paths, named.targets, strict=True):
        assert f"/{named.classes[t]}/" in path


@needs_shared
def test_cub_unknown_class_is_one_line():
    with pytest.raises(DatasetFormatError, match=r"data.classes: 1 selected classes not in this data set: \[101\]"):
        build_datasets(load_config(None, [*CUB, "data.classes=[1, 101]"]))


@needs_shared
def test_reid_identity_range_filters_every_split():
    cfg = load_config(None, ["data.dataset=market1501", f"data.root={SHARED_DATA / 'mars_reid_mini'}",
                             "data.identities=0-30"])
    sets = build_datasets(cfg)
    assert all(p <= 30 for p in sets["train"].original_pids)
    assert sets["train"].pids == [sorted(set(sets["train"].original_pids)).index(p)
                                  for p in sets["train"].original_pids]
    assert all(p <= 30 for s in ("query", "gallery") for p in sets[s].original_pids)


@pytest.mark.parametrize("overrides, key", [
    (["data.classes=5-1"], "data.classes"),
    (["data.dataset=market1501", "data.classes=1-3"], "data.classes"),
    (["data.identities=1-3"], "data.identities"),
    (["data.train_splits=[train,train]"], "data.train_splits"),
    (["data.train_splits=[]"], "data.train_splits"),
    (["data.dataset=market1501", "data.train_splits=[train,test]"], "data.train_splits"),
])
def test_bad_parts_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)
