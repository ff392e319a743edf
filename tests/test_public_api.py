"""The public API re-exported by ``ghist_core``: lazy, and the very objects of the owning modules."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ghist_core

HEAVY = ("torch", "pandas", "anndata", "scipy", "openslide", "skimage")


def test_importing_ghist_core_is_cheap() -> None:
    """``import ghist_core`` loads none of the heavy libraries until a name is used."""
    code = ("import json, sys, ghist_core\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("name", ghist_core.__all__)
def test_each_public_name_is_the_owning_modules_object(name: str) -> None:
    owner = importlib.import_module(ghist_core._PUBLIC[name])
    assert getattr(ghist_core, name) is getattr(owner, name)


def test_the_documented_names_are_public() -> None:
    assert {"open_slide", "Project", "predict_slide", "load_segmenter", "load_ghist"} <= set(ghist_core.__all__)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'segment'"):
        ghist_core.segment  # noqa: B018
    assert not hasattr(ghist_core, "open_slides")


def test_the_root_api_runs_a_slide_into_a_project(tmp_path: Path, small_slide_png: Path, tiny_ghist: Path) -> None:
    """The names work together as the README shows: slide, project, segmenter, model."""
    from ghist_core import Project, load_ghist, load_segmenter, open_slide

    with open_slide(small_slide_png, mpp=0.499) as slide:
        assert slide.dimensions == (700, 700) and slide.mpp == pytest.approx(0.499)
        rgb = slide.read_region((0, 0), 0, (256, 256))
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)

    project = Project.create(tmp_path / "study")
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=0.499)
    assert Project.open(tmp_path / "study").list_slides()["slide_id"].tolist() == [record.slide_id]

    _, cells = load_segmenter(kind="classical").segment_tile(rgb, 0.499)
    assert len(cells) > 0 and {"x_um", "y_um"} <= set(cells.columns)
    model = load_ghist(path=tiny_ghist / "ghist-her2st.safetensors", device="cpu")
    assert "ERBB2" in model.genes
