"""Where things live: one place for every default location and id.

The bundled weights and demo are read from the repository's ``weights/`` and ``demo/``
when running from a checkout (editable install, tests, the app), and from the copy the
build puts in the package (``ghist_core/_bundled/``, see setup.py) when installed from a
wheel, so ``pip install ghist-studio`` finds its own model wherever it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder above the package: the repository root when running from a checkout
#: (see ``IN_CHECKOUT``); for a wheel install it is site-packages and means nothing.
REPO_DIR = PACKAGE_DIR.parent
#: True when the package runs from the repository (it has pyproject.toml and weights/).
IN_CHECKOUT = (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "weights").is_dir()
#: Where a wheel carries the repository's weights/ and demo/.
PACKAGED_DATA_DIR = PACKAGE_DIR / "_bundled"


def _bundled(name: str) -> Path:
    """The checkout's top-level folder ``name`` when in a checkout, else the packaged copy."""
    return REPO_DIR / name if IN_CHECKOUT else PACKAGED_DATA_DIR / name


#: Weights shipped with the project (safetensors + JSON cards).
BUNDLED_WEIGHTS_DIR = _bundled("weights")
#: The bundled demo project's inputs (small real H&E region, clinical CSV).
DEMO_DIR = _bundled("demo")
#: The project's own Hugging Face Hub repository (used when no model id is given).
DEFAULT_MODEL_REPO = "ghist-studio/ghist-her2st"
#: The learned nucleus segmenter used when none is named (a bundled weights name): the stain-robust
#: fine-tune of nuclei-seg (as accurate on CoNSeP/MoNuSeg, far better on re-stained slides; README).
DEFAULT_SEGMENTER = "nuclei-seg-stain"


def shared_data_dir() -> Path:
    """The read-only shared data folder used by tests and training scripts.

    ``GHIST_SHARED_DATA`` overrides it; it may not exist (a fresh machine), and callers
    that need it say so (tests skip, scripts stop with the folder named).
    """
    return Path(os.environ.get("GHIST_SHARED_DATA", REPO_DIR.parent / "shared" / "data"))


def default_project_dir() -> Path:
    """Where the app keeps its projects unless told otherwise."""
    return Path(os.environ.get("GHIST_PROJECTS_DIR", Path.home() / "ghist-projects"))
