"""Shared fixtures: the read-only shared data and small files made on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghist_core.paths import DEMO_DIR, shared_data_dir

SHARED = shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (read-only in CI)."""
    assert SHARED.is_dir(), f"shared data not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def svs_path(shared_data: Path) -> Path:
    """The real Aperio SVS (CMU-1-Small-Region, 2220 x 2967 px, 0.499 µm/px)."""
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def target_png(shared_data: Path) -> Path:
    """TIAToolbox's H&E stain-normalisation target (1000 x 1000 px PNG)."""
    return shared_data / "slides" / "tiatoolbox_target_image.png"


@pytest.fixture(scope="session")
def demo_slide() -> Path:
    """The bundled demo slide, shipped inside the project."""
    return DEMO_DIR / "CMU-1-Small-Region.svs"
