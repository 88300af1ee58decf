"""pytest hooks and fixtures shared by every test; helpers to import (the tiny model, the sample data) are in
tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import SHARED_DATA, write_market_layout

# Tiny trained runs for the inference-command tests, defined once here so that each is trained once per session.
from tests.tiny_runs import fgvc_run, reid_run  # noqa: F401


@pytest.fixture
def market_data(tmp_path):
    """A small Market-1501 layout (:func:`tests.helpers.write_market_layout`)."""
    return write_market_layout(tmp_path / "market")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    """dcal's log messages reach the console as under the ``dcal`` command (its handler), so that tests of library
    functions read the same stdout / stderr as a user of the commands; ``caplog`` sees them too."""
    from dcal.cli import configure_logging

    configure_logging()


def pytest_sessionstart(session):
    """In CI (DCAL_REQUIRE_SHARED=1, set by .ci/run) the real-data tests must run, not skip."""
    if os.environ.get("DCAL_REQUIRE_SHARED") == "1" and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"DCAL_REQUIRE_SHARED=1 but {SHARED_DATA} is absent: real-data tests would skip")
