"""Shared test helpers: tiny models and the location of the real sample data in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dcal

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (../shared/data is present in CI)"
)

TINY = dict(depth=3, embed_dim=48, num_heads=3)


def tiny_model(task: str = "fgvc", img_size=32, num_classes: int = 5, **kw) -> dcal.DCAL:
    """A 3-block, 48-dim DeiT-style DCAL model: fast on the CPU, same code paths as DeiT-T."""
    kw.setdefault("pwca_blocks", TINY["depth"])
    return dcal.create_model(
        "deit_tiny_patch16_224", task=task, num_classes=num_classes, img_size=img_size, **{**TINY, **kw}
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionstart(session):
    """In CI (DCAL_REQUIRE_SHARED=1, set by .ci/run) the real-data tests must run, not skip."""
    import os

    if os.environ.get("DCAL_REQUIRE_SHARED") == "1" and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"DCAL_REQUIRE_SHARED=1 but {SHARED_DATA} is absent: real-data tests would skip")


# Tiny trained runs for the inference-command tests, defined once here so that each is trained once per session.
from tests.tiny_runs import fgvc_run, reid_run  # noqa: E402, F401
