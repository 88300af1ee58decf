"""``import dcal`` gives the whole package as attributes, without importing torch or timm up front."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import dcal


def test_import_dcal_is_light():
    code = "import sys, dcal; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subpackages_and_api_are_attributes():
    code = (
        "import dcal\n"
        "assert callable(dcal.data.build_dataset) and callable(dcal.losses.DCALLoss)\n"
        "assert callable(dcal.metrics.evaluate_reid) and callable(dcal.engine.fit)\n"
        "assert dcal.create_model is dcal.model.create_model and dcal.DCAL is dcal.model.DCAL\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    for name in dcal.SUBMODULES:
        assert isinstance(getattr(dcal, name), types.ModuleType)
    assert set(dcal.__all__) <= set(dir(dcal))


def test_every_module_of_the_package_is_listed():
    root = Path(dcal.__file__).parent
    found = {p.stem for p in root.glob("*.py") if not p.name.startswith("_")}
    found |= {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert found == set(dcal.SUBMODULES)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dcal.nope  # noqa: B018
