"""Shared fixtures: where the real data lives (beside the checkout, never copied into it)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IXI_DIR = SHARED_DATA / "ixi-t1-2mm"


@pytest.fixture
def ixi_dir() -> Path:
    if not IXI_DIR.is_dir():
        pytest.skip(f"shared IXI data not found at {IXI_DIR}")
    return IXI_DIR
