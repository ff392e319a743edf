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


def make_tiny_ghist(folder: Path, seed: int = 0, **config) -> Path:
    """A small, randomly initialised but real GHIST model saved as safetensors + card.

    Used where the bundled weights would make a test slow; predictions are
    meaningless but every code path (pooling, heads, writing) is the real one.
    """
    import torch

    from ghist_core.model import GhistConfig, GhistNet
    from ghist_core.model.predict import save_ghist

    torch.manual_seed(seed)
    cfg = GhistConfig(
        genes=["ERBB2", "ESR1", "CD3E", "KRT5", "MKI67"],
        cell_types=["Malignant", "T", "Fibroblast"],
        widths=(8, 16, 32, 64),
        fpn_dim=16,
        embed_dim=16,
        patch_px=128,
        use_reference=False,
        **config,
    )
    net = GhistNet(cfg)
    return save_ghist(net, folder, {"training": {"data": "none: random weights for tests"}})


@pytest.fixture(scope="session")
def tiny_ghist(tmp_path_factory) -> Path:
    """Folder holding a tiny GHIST model (``ghist-her2st.safetensors`` + ``.json``)."""
    folder = tmp_path_factory.mktemp("tiny_ghist")
    make_tiny_ghist(folder)
    return folder


@pytest.fixture(scope="session")
def small_slide_png(tmp_path_factory, demo_slide: Path) -> Path:
    """A 700 x 700 px crop (≈ 350 µm square, 0.499 µm/px) of the demo slide, as PNG."""
    from PIL import Image

    from ghist_core.io.slide import open_slide

    out = tmp_path_factory.mktemp("small_slide") / "crop.png"
    with open_slide(demo_slide) as s:
        rgb = s.read_region((600, 1200), 0, (700, 700))
    Image.fromarray(rgb).save(out)
    return out
