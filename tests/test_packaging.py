"""The wheel works outside the checkout: it carries its model and demo, and `ghist predict` runs.

The wheel is built from a copy of the sources (so stale build/ folders of the checkout
cannot leak in) and installed into a fresh venv in a temporary folder. That venv sees the
system's installed packages through a folder of links that leaves out the ``[app]`` and
``[cluster]`` extras (streamlit, plotly, pydeck, dask) and the checkout's editable install,
so the run proves three things at once: the wheel finds its bundled weights and demo, the
CLI needs only the base install, and nothing is read from the repository.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ghist_core.paths import REPO_DIR

#: Top-level names of the extras' packages, hidden from the venv (base install only).
EXTRAS = ("streamlit", "plotly", "_plotly_utils", "pydeck", "dask", "distributed")
#: What the checkout's own install leaves in site-packages; hidden so it cannot shadow the wheel.
CHECKOUT_INSTALL = ("ghist_core", "ghist_studio", "__editable__")
SOURCES = ("pyproject.toml", "setup.py", "README.md", "requirements.txt", "ghist_core", "weights", "demo")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _hidden(name: str) -> bool:
    top = name.split("-")[0].split(".")[0].lower()
    return name.endswith(".pth") or top in EXTRAS or top.startswith(CHECKOUT_INSTALL)


def _base_site_dir(folder: Path) -> Path:
    """Links to every installed package of the system except the extras and the checkout."""
    folder.mkdir()
    roots = [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    for root in roots:
        for entry in root.iterdir():
            if not _hidden(entry.name) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv outside the checkout with the freshly built wheel and only base dependencies."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO_DIR / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "_bundled", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)],
         cwd=tmp)
    (wheel,) = dist.glob("ghist_studio-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_system_base.pth").write_text(f"{_base_site_dir(tmp / 'system-base')}\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], cwd=tmp)
    return venv


def _clean_env() -> dict[str, str]:
    """The environment without anything that points back at the checkout or the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GHIST_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", GHIST_PROJECTS_DIR=os.devnull)
    return env


@pytest.mark.slow
def test_wheel_carries_its_weights_and_demo(wheel_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import json, importlib.util, ghist_core, ghist_core.paths as p;"
        "print(json.dumps({'file': ghist_core.__file__, 'weights': str(p.BUNDLED_WEIGHTS_DIR),"
        " 'demo': str(p.DEMO_DIR), 'in_checkout': p.IN_CHECKOUT,"
        " 'weight_files': sorted(x.name for x in p.BUNDLED_WEIGHTS_DIR.iterdir()),"
        " 'demo_files': sorted(x.name for x in p.DEMO_DIR.iterdir()),"
        " 'streamlit': importlib.util.find_spec('streamlit') is not None}))"
    )
    out = json.loads(_run([str(wheel_venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=_clean_env()).stdout)
    package = Path(out["file"]).parent
    assert package.is_relative_to(wheel_venv), f"ghist_core imported from {package}, not from the wheel in {wheel_venv}"
    assert Path(out["weights"]).is_relative_to(package) and Path(out["demo"]).is_relative_to(package)
    assert not out["in_checkout"]
    assert {"nuclei-seg.safetensors", "nuclei-seg.json", "ghist-her2st.safetensors", "ghist-her2st.json"} <= set(
        out["weight_files"])
    assert {"CMU-1-Small-Region.svs", "tcga_brca_clinical.csv"} <= set(out["demo_files"])
    assert not out["streamlit"], "the venv should see only the base install"
    for name in out["weight_files"]:  # byte-for-byte the repository's files
        assert (Path(out["weights"]) / name).read_bytes() == (REPO_DIR / "weights" / name).read_bytes()


@pytest.mark.slow
def test_installed_cli_predicts_the_bundled_demo(wheel_venv: Path, tmp_path: Path) -> None:
    demo_svs = next((wheel_venv / "lib").glob("python*/site-packages/ghist_core/_bundled/demo/CMU-1-Small-Region.svs"))
    project = tmp_path / "project"
    proc = _run([str(wheel_venv / "bin" / "ghist"), "predict", str(demo_svs), "--project", str(project),
                 "--segmenter", "nuclei-seg", "--device", "cpu", "--patient", "DEMO-01"],
                cwd=tmp_path, env=_clean_env(), timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_cells"] > 100
    h5ad = Path(result["h5ad"])
    assert h5ad.is_file() and h5ad.is_relative_to(project)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_requirements_txt_is_the_base_install_plus_app_and_cluster() -> None:
    """The README's `pip install -r requirements.txt` and the package metadata name the same libraries."""
    meta = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    pinned = [ln for ln in (REPO_DIR / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert _names(pinned) == _names(meta["dependencies"] + extras["app"] + extras["cluster"])
    assert "torch==2.13.0" in pinned and "pandas>=2.2,<3" in pinned
    assert not _names(meta["dependencies"]) & _names(extras["app"] + extras["cluster"])
