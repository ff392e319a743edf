"""Shared fixtures: the bundled demo, small files made on the fly, and the external datasets.

Most tests need nothing outside the repository: the demo slide and clinical table ship in
``demo/``. A few need an external dataset from the shared data folder (``../shared/data``,
or ``$GHIST_SHARED_DATA``); they skip, naming the missing folder, on a machine without it
and run in CI, where it is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ghist_core.paths import DEMO_DIR, shared_data_dir

SHARED = shared_data_dir()


def require_shared(*parts: str) -> Path:
    """``<shared data>/<parts>``, or skip the calling test naming the missing folder or file."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        shown = "/".join(("../shared/data", *parts))
        pytest.skip(f"needs {shown} (not present at {path}; set GHIST_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (read-only in CI); tests using it skip when it is absent."""
    return require_shared()


@pytest.fixture(scope="session")
def shared_path():
    """:func:`require_shared` as a fixture: ``shared_path("nuclei", "monuseg")`` or skip."""
    return require_shared


@pytest.fixture(scope="session")
def svs_path() -> Path:
    """The real Aperio SVS (CMU-1-Small-Region, 2220 x 2967 px, 0.499 µm/px), bundled in demo/.

    The shared data folder holds a byte-identical copy; the bundled one lets these tests run anywhere.
    """
    return DEMO_DIR / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def target_png() -> Path:
    """TIAToolbox's H&E stain-normalisation target (1000 x 1000 px PNG), from the shared data."""
    return require_shared("slides", "tiatoolbox_target_image.png")


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


@pytest.fixture(scope="session")
def demo_png_1000(tmp_path_factory, demo_slide: Path) -> Path:
    """A 1000 x 1000 px H&E crop of the demo slide as a PNG that does not state its µm per pixel."""
    from PIL import Image

    from ghist_core.io.slide import open_slide

    out = tmp_path_factory.mktemp("demo_png") / "he_1000.png"
    with open_slide(demo_slide) as s:
        rgb = s.read_region((600, 1200), 0, (1000, 1000))
    Image.fromarray(rgb).save(out)
    return out
