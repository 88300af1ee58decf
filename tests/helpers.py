"""What the tests share: the tiny model and the location of the real sample data in ../shared/data.

Import from here (``from tests.helpers import tiny_model``); ``tests/conftest.py`` holds only pytest's hooks and
fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dcal

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (../shared/data is present in CI)"
)

# the tiny backbone: DeiT-T's code paths at 3 blocks of width 48, fast on the CPU
TINY_ARCH = {"depth": 3, "embed_dim": 48, "num_heads": 3}
# the tiny backbone of config-driven runs (dcal train ...): 2 blocks, 8-pixel patches (16 patches at 32 pixels)
TINY_TIMM_KWARGS = "model.timm_kwargs={depth: 2, embed_dim: 48, num_heads: 3, patch_size: 8}"


def tiny_model(task: str = "fgvc", img_size: Any = 32, num_classes: int = 5,
               backbone: str = "deit_tiny_patch16_224", **kw: Any) -> dcal.DCAL:
    """A DCAL model on the :data:`TINY_ARCH` backbone with PWCA on every block; ``kw`` go to
    ``dcal.create_model`` and override the architecture (``depth=2``, ``patch_size=8``, ...)."""
    kw.setdefault("pwca_blocks", kw.get("depth", TINY_ARCH["depth"]))
    return dcal.create_model(backbone, task=task, num_classes=num_classes, img_size=img_size, **{**TINY_ARCH, **kw})
