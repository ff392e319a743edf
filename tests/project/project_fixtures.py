"""Fixtures for the project store tests (imported by name: a second conftest.py would shadow the root one).

A fresh project, small PNG slides, a snapshot of store + folder, a child-process environment.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from ghist_core import paths
from ghist_core.project import Project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    with Project.create(tmp_path / "proj", name="Test project") as p:
        yield p


@pytest.fixture
def make_png() -> Callable[..., Path]:
    """Write a small random RGB PNG (a usable slide with an explicit mpp)."""

    def make(path: Path, size: int = 64, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        return path

    return make


@pytest.fixture
def snapshot() -> Callable[[Project], tuple]:
    """Row counts of every table and the full folder listing with file hashes."""

    def take(project: Project) -> tuple:
        c = project._conn()
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        counts = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in sorted(tables)}
        listing = sorted(
            (p.relative_to(project.folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in project.folder.rglob("*")
            if not p.name.startswith("project.sqlite")  # the db and its -wal/-shm files change on reads
        )
        return counts, listing

    return take


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for a child Python process that imports ghist_core from this checkout."""
    return dict(os.environ, PYTHONPATH=str(paths.REPO_DIR))
