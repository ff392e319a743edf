"""``ghist export`` through a real subprocess on a real project."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from ghist_core.project.store import Project


def _ghist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghist_core.cli", "export", *args], capture_output=True, text=True, timeout=300)


def test_export_one_slide_as_csv_with_chosen_genes(predicted_project, tmp_path):
    folder, slide_id = predicted_project
    out = tmp_path / "cells.csv"
    r = _ghist("--project", str(folder), "--slide", str(slide_id), "--format", "csv", "--out", str(out), "--genes", "ERBB2,CD3E")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"format": "csv", "path": str(out)}
    table = pd.read_csv(out)
    assert list(table.columns[-2:]) == ["ERBB2", "CD3E"] and "ESR1" not in table.columns and len(table) > 20


def test_export_all_finished_slides_into_a_folder(predicted_project, tmp_path, small_slide_png):
    folder, slide_id = predicted_project
    from PIL import Image

    other = tmp_path / "other.png"  # a different file (the store would dedupe the same bytes)
    Image.open(small_slide_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    with Project.open(folder) as project:  # a slide without any run is not exported
        assert project.add_slide(other, patient_id="P-002", mpp=0.25).slide_id != slide_id
    r = _ghist("--project", str(folder), "--all", "--format", "geojson", "--out", str(tmp_path / "qupath"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "qupath").iterdir()) == ["manifest.csv", f"slide_{slide_id}.geojson"]
    manifest = pd.read_csv(tmp_path / "qupath" / "manifest.csv")  # which file is which slide and patient
    assert manifest[["file", "slide_id"]].values.tolist() == [[f"slide_{slide_id}.geojson", slide_id]]
    doc = json.loads((tmp_path / "qupath" / f"slide_{slide_id}.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) > 20


@pytest.mark.parametrize("args, code, message", [
    (["--slide", "1", "--format", "csv", "--out", "x.csv", "--genes", "NOT_A_GENE"], 3, "NOT_A_GENE"),
    (["--slide", "999", "--format", "csv", "--out", "x.csv"], 3, "There is no slide 999 in this project"),
    (["--slide", "1", "--format", "xlsx", "--out", "x.xlsx"], 2, "invalid choice"),
    (["--format", "csv", "--out", "x.csv"], 2, "--slide"),
])
def test_export_exit_codes(predicted_project, tmp_path, args, code, message):
    folder, _ = predicted_project
    r = _ghist("--project", str(folder), *args)
    assert r.returncode == code and message in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr


def test_an_output_that_cannot_be_written_is_a_plain_error(predicted_project, tmp_path):
    """A folder given for one slide's file, or a "folder" that is a file: exit 3 and a sentence, no traceback."""
    folder, slide_id = predicted_project
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "notes.txt" / "x.csv", "Could not write")):
        r = _ghist("--project", str(folder), "--slide", str(slide_id), "--format", "csv", "--out", str(out))
        assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob(".*.part"))


def test_export_from_a_folder_that_is_not_a_project(tmp_path):
    r = _ghist("--project", str(tmp_path), "--slide", "1", "--format", "h5ad", "--out", str(tmp_path / "x.h5ad"))
    assert r.returncode == 3 and "error:" in r.stderr and "Traceback" not in r.stderr
