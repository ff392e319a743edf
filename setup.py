"""Build step that ships the bundled model and demo inside the wheel.

Metadata lives in pyproject.toml. This file only adds one thing setuptools cannot say
declaratively: ``weights/`` and ``demo/`` stay at the top of the repository (the app,
benches and docs point there), yet a wheel installed outside the checkout must find them,
so ``build_py`` copies them into the built package as ``ghist_core/_bundled/{weights,demo}``
(see ``ghist_core.paths``). Editable installs skip the copy: they read the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Repository folder -> file patterns copied into ghist_core/_bundled/<folder>.
BUNDLED = {"weights": ("*.safetensors", "*.json"), "demo": ("*.svs", "*.csv", "*.md")}


class BuildPyWithBundled(build_py):
    """``build_py`` plus a copy of the bundled weights and demo into the package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, patterns in BUNDLED.items():
            src = ROOT / folder
            files = sorted({p for pattern in patterns for p in src.glob(pattern) if p.is_file()})
            if not files:
                raise RuntimeError(f"nothing to bundle in {src}: the wheel would ship without its {folder}")
            dest = Path(self.build_lib) / "ghist_core" / "_bundled" / folder
            dest.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copyfile(path, dest / path.name)


setup(cmdclass={"build_py": BuildPyWithBundled})
