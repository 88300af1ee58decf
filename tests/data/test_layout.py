"""One dataset-root finder and one error family for both tasks' readers."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcal.data.fgvc import build_fgvc_dataset
from dcal.data.layout import DatasetFormatError, DatasetNotFoundError, find_dataset_root
from dcal.data.reid import build_reid_dataset


def test_root_itself_first_then_the_conventional_sub_folders(tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011").mkdir()
    (tmp_path / "CUB_200_2011" / "images.txt").write_text("")
    assert find_dataset_root(tmp_path, ("CUB_200_2011",), ["images.txt"], "CUB") == tmp_path / "CUB_200_2011"
    (tmp_path / "images.txt").write_text("")
    assert find_dataset_root(tmp_path, ("CUB_200_2011",), ["images.txt"], "CUB") == tmp_path


def test_the_error_names_what_the_closest_folder_lacks(tmp_path: Path) -> None:
    (tmp_path / "VeRi" / "image_train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset_root(tmp_path, ("VeRi",), ["image_train", "image_test"], "VeRi-776")
    message = str(info.value)
    assert message.startswith("VeRi-776: missing ") and str(tmp_path / "VeRi" / "image_test") in message
    assert "image_train," not in message.split(";")[0]  # present there, so not listed as missing


@pytest.mark.parametrize("build", [lambda root: build_fgvc_dataset("cub", root, "train"),
                                   lambda root: build_reid_dataset("market1501", root, "train")],
                         ids=["fgvc", "reid"])
def test_both_tasks_raise_the_same_family_for_a_missing_dataset(tmp_path: Path, build) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        build(tmp_path / "nowhere")
    assert isinstance(info.value, DatasetFormatError) and isinstance(info.value, FileNotFoundError)
