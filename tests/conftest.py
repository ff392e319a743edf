"""Shared fixtures: the bundled demo, small files made on the fly, and the external datasets.

Most tests need nothing outside the repository: the demo slide and clinical table ship in
``demo/``. A few need an external dataset from the shared data folder (``../shared/data``,
or ``$GHIST_SHARED_DATA``); they skip, naming the missing folder, on a machine without it
and run in CI, where it is present.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from ghist_core.paths import DEMO_DIR
from testkit import make_tiny_ghist, require_shared  # noqa: F401  (fixtures below use them)


# The app's workers share a cap per machine (ghist_core.project.locks.take_worker_slot); this test
# session's workers (and the servers it starts) get their own slots, so two suites running side by
# side on one machine never wait for each other's workers, and each test its own (below), so a
# worker an earlier test left running never holds up a later test's.
os.environ["GHIST_WORKER_SLOTS_DIR"] = tempfile.mkdtemp(prefix="ghist-test-worker-slots-")


@pytest.fixture(autouse=True)
def _own_worker_slots(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GHIST_WORKER_SLOTS_DIR", str(tmp_path_factory.mktemp("worker_slots")))


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest makes the page script ``sys.modules["__main__"]`` and leaves it there; a later
    Dask LocalCluster (spawned worker processes re-import ``__main__``) would then re-run that page in
    each worker, which fails without a Streamlit session ("Nanny failed to start worker process").
    Put the test runner's own ``__main__`` back after every test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main



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




@pytest.fixture(scope="session")
def tiny_ghist(tmp_path_factory) -> Path:
    """Folder holding a tiny GHIST model (``ghist-her2st.safetensors`` + ``.json``)."""
    folder = tmp_path_factory.mktemp("tiny_ghist")
    make_tiny_ghist(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> Path:
    """Folder holding a tiny GHIST model with 3 ensemble members (seeds), for the per-cell uncertainty."""
    folder = tmp_path_factory.mktemp("tiny_ensemble")
    make_tiny_ghist(folder, members=3)
    return folder


@pytest.fixture(scope="session")
def small_slide_png(tmp_path_factory, demo_slide: Path) -> Path:
    """A 700 x 700 px crop (≈ 350 µm square, 0.499 µm/px) of the demo slide, as PNG."""
    from slide_factory import demo_crop_png

    return demo_crop_png(tmp_path_factory.mktemp("small_slide") / "crop.png", demo_slide, (600, 1200), 700)


@pytest.fixture(scope="session")
def demo_png_1000(tmp_path_factory, demo_slide: Path) -> Path:
    """A 1000 x 1000 px H&E crop of the demo slide as a PNG that does not state its µm per pixel."""
    from slide_factory import demo_crop_png

    return demo_crop_png(tmp_path_factory.mktemp("demo_png") / "he_1000.png", demo_slide, (600, 1200), 1000)
