"""The ``ghist`` command: help, exit codes and messages a scripter can rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ghist_core.cli import EXIT_INPUT, EXIT_USAGE, main
from ghist_core.pipeline.cohort import read_manifest
from ghist_core.errors import ClinicalTableError


def _ghist(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghist_core.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("sub", [[], ["predict"], ["cohort"], ["weights"]])
def test_help_for_each_command(sub):
    out = _ghist(*sub, "--help")
    assert out.returncode == 0
    assert "usage: ghist" in out.stdout


def test_usage_error_exit_code(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict"])  # no slide given
    assert exc.value.code == EXIT_USAGE


def test_unreadable_slide_gives_input_error(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide")
    out = _ghist("predict", str(bad), "--project", str(tmp_path / "proj"))
    assert out.returncode == EXIT_INPUT
    assert "notes.svs" in out.stderr and "Traceback" not in out.stderr


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("slide_path,patient_id,mpp\nslides/a.svs,P1,\n/abs/b.png,P2,0.5\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert rows[0].slide_path == str(tmp_path / "slides" / "a.svs") and rows[0].mpp is None
    assert rows[1].slide_path == "/abs/b.png" and rows[1].mpp == 0.5 and rows[1].patient_id == "P2"
    (tmp_path / "bad.csv").write_text("path,patient\nx,y\n")
    with pytest.raises(ClinicalTableError, match="slide_path"):
        read_manifest(tmp_path / "bad.csv")
