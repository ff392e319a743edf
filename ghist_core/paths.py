"""Where things live: one place for every default location and id."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
#: Weights shipped with the project (safetensors + JSON cards).
BUNDLED_WEIGHTS_DIR = REPO_DIR / "weights"
#: The bundled demo project's inputs (small real H&E region, clinical CSV).
DEMO_DIR = REPO_DIR / "demo"
#: The project's own Hugging Face Hub repository (used when no model id is given).
DEFAULT_MODEL_REPO = "ghist-studio/ghist-her2st"


def shared_data_dir() -> Path:
    """The read-only shared data folder used by tests and training scripts."""
    return Path(os.environ.get("GHIST_SHARED_DATA", REPO_DIR.parent / "shared" / "data"))


def default_project_dir() -> Path:
    """Where the app keeps its projects unless told otherwise."""
    return Path(os.environ.get("GHIST_PROJECTS_DIR", Path.home() / "ghist-projects"))
