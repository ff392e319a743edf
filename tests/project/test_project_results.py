"""Result files, run folders and clinical tables on real files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ghist_core.errors import InvalidFileNameError, StoreError
from ghist_core.paths import DEMO_DIR
from ghist_core.project import Project
from project_fixtures import make_png, project, snapshot  # noqa: F401 (pytest fixtures)


def test_result_files_and_run_dirs(project: Project, tmp_path: Path, make_png) -> None:
    sid = project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5, patient_id="P1").slide_id
    rid = project.start_run(sid, model_id="m", weights_sha256="s", device="cpu")
    assert project.run_dir(rid) == project.folder / "runs" / str(rid) and project.run_dir(rid).is_dir()
    with pytest.raises(StoreError, match="no run 999"):
        project.run_dir(999)

    out = project.folder / "results" / "a.h5ad"
    out.write_bytes(b"result bytes")
    project.add_result_file(rid, "h5ad", out)
    with pytest.raises(StoreError, match="outside the project folder"):
        project.add_result_file(rid, "grid", make_png(tmp_path / "outside.png"))
    with pytest.raises(StoreError, match="does not exist"):
        project.add_result_file(rid, "grid", project.folder / "results" / "missing.zarr")
    assert project.result_files(rid) == {"h5ad": out}
    info = project.result_file_info(rid)
    assert info.loc[0, "path"] == "results/a.h5ad" and info.loc[0, "sha256"] == hashlib.sha256(b"result bytes").hexdigest()
    project.finish_run(rid, n_cells=1)

    project.delete_slide(sid)
    assert project.list_slides().empty and project.list_runs().empty
    assert not out.exists() and not (project.folder / "runs" / str(rid)).exists()
    assert not list((project.folder / "slides").iterdir())
    with pytest.raises(StoreError, match="no slide"):
        project.get_slide(sid)


def test_clinical_table_kept_unchanged(project: Project, snapshot) -> None:
    src = DEMO_DIR / "tcga_brca_clinical.csv"  # the bundled copy of the shared TCGA table
    mapping = {"patient_id": "bcr_patient_barcode", "time": "OS.time", "event": "OS"}
    tid = project.add_clinical_table(src, name="TCGA BRCA", mapping=mapping)
    path, got = project.get_clinical_table(tid)
    assert path.read_bytes() == src.read_bytes() and got == mapping
    project.set_clinical_mapping(tid, {**mapping, "group": "ER"})
    df = project.list_clinical_tables()
    assert df.loc[0, "name"] == "TCGA BRCA" and df.loc[0, "mapping"]["group"] == "ER"
    before = snapshot(project)
    with pytest.raises(InvalidFileNameError):
        project.add_clinical_table(src, name="x", original_name="../clinical.csv")
    assert snapshot(project) == before
    with pytest.raises(StoreError, match="no clinical table 99"):
        project.set_clinical_mapping(99, {})
