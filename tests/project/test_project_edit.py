"""Editing a slide's µm/px and patient, deleting slides / patients / runs, and what a kill midway leaves.

Real SQLite, real files: every check reads the project back (rows and the folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghist_core.errors import InvalidMppError, RunStateError, SlideError, StoreError
from ghist_core.project import Project, RunStatus, deletions, overview, slides, uploads
from ghist_core.project.store import project_folder_for
from project_fixtures import make_png, project, snapshot, subprocess_env  # noqa: F401  (fixtures)


def finished_run(project: Project, slide_id: int, n_cells: int = 10) -> tuple[int, list[Path]]:
    """A finished run with two result files and a checkpoint, through the store's own API."""
    rid = project.start_run(slide_id, model_id="m", weights_sha256="", device="cpu")
    out = project.folder / "results" / f"slide_{slide_id}"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"run_{rid}.h5ad", out / f"run_{rid}.grid.h5"]
    for kind, f in zip(("h5ad", "grid"), files):
        f.write_bytes(f"{kind} of run {rid}".encode())
        project.add_result_file(rid, kind, f)
    (project.run_dir(rid) / "block_0.npz").write_bytes(b"checkpoint")
    project.finish_run(rid, n_cells=n_cells)
    return rid, files + [project.folder / "runs" / str(rid)]


@pytest.fixture
def state(snapshot):
    """The store + folder snapshot, without the run lock files (taking a lock is not a change)."""

    def take(project: Project) -> tuple:
        counts, listing = snapshot(project)
        return counts, [e for e in listing if not e[0].startswith("locks")]

    return take


@pytest.fixture
def slide(project: Project, make_png, tmp_path: Path):
    rec = project.add_slide(make_png(tmp_path / "he.png"), patient_id="P1", mpp=0.5)
    return rec


# --- editing ---------------------------------------------------------------------------------

def test_new_mpp_deletes_the_runs_computed_at_the_old_one(project: Project, slide) -> None:
    r1, f1 = finished_run(project, slide.slide_id)
    r2, f2 = finished_run(project, slide.slide_id)
    plan = project.plan_slide_edit(slide.slide_id, mpp=0.25)
    assert plan.mpp_changed and plan.invalidates_runs and plan.run_ids == (r1, r2)
    assert "2 runs" in plan.describe() and "0.5" in plan.describe()
    assert len(project.list_runs()) == 2 and all(p.exists() for p in f1 + f2)  # planning changed nothing

    done = project.update_slide(slide.slide_id, mpp=0.25)
    assert done.run_ids == (r1, r2)
    assert project.get_slide(slide.slide_id).mpp == 0.25
    assert project.list_runs().empty and not any(p.exists() for p in f1 + f2)
    assert overview.finished_slides(project).empty  # no map can show a result of the old µm/px
    table = overview.slide_table(project)
    assert table["prediction"].tolist() == [overview.NOT_RUN] and table["cells"].tolist() == [overview.NONE_TEXT]
    assert not deletions.pending_removals(project.db)
    assert not (project.folder / "results" / f"slide_{slide.slide_id}").exists()


def test_patient_change_keeps_runs(project: Project, slide) -> None:
    rid, files = finished_run(project, slide.slide_id)
    edit = project.update_slide(slide.slide_id, patient_id="P2", mpp=0.5)
    assert edit.patient_changed and not edit.mpp_changed and not edit.invalidates_runs
    assert project.get_slide(slide.slide_id).patient_id == "P2"
    assert project.list_runs()["run_id"].tolist() == [rid] and all(p.exists() for p in files)
    assert set(project.list_patients()["patient_id"]) == {"P2"}  # P1 held nothing more: not left behind
    project.update_slide(slide.slide_id, patient_id=None)
    assert project.get_slide(slide.slide_id).patient_id is None
    assert len(project.list_patients()) == 0


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1e6])
def test_bad_mpp_is_refused_and_changes_nothing(project: Project, slide, state, bad) -> None:
    finished_run(project, slide.slide_id)
    before = state(project)
    with pytest.raises(InvalidMppError):
        project.update_slide(slide.slide_id, mpp=bad)
    assert state(project) == before


def test_active_run_blocks_mpp_edit_and_deletion(project: Project, slide, state) -> None:
    finished_run(project, slide.slide_id)
    queued = project.start_run(slide.slide_id, model_id="m", weights_sha256="", device="cpu", status=RunStatus.QUEUED)
    before = state(project)
    with pytest.raises(RunStateError, match=f"Run {queued}.*Cancel"):
        project.update_slide(slide.slide_id, mpp=0.25)
    with pytest.raises(RunStateError):
        project.delete_slide(slide.slide_id)
    with pytest.raises(RunStateError):
        project.delete_run(queued)
    with pytest.raises(RunStateError):
        project.delete_patient("P1")
    assert state(project) == before
    project.update_slide(slide.slide_id, patient_id="P9")  # the patient may change meanwhile
    project.cancel_run(queued)
    project.update_slide(slide.slide_id, mpp=0.25)
    assert project.list_runs().empty


# --- deleting ----------------------------------------------------------------------------------

def test_delete_run_keeps_the_others(project: Project, slide) -> None:
    r1, f1 = finished_run(project, slide.slide_id)
    r2, f2 = finished_run(project, slide.slide_id)
    project.delete_run(r2)
    assert project.list_runs()["run_id"].tolist() == [r1]
    assert all(p.exists() for p in f1) and not any(p.exists() for p in f2)
    assert project.latest_run(slide.slide_id).run_id == r1
    with pytest.raises(StoreError, match="no run"):
        project.delete_run(r2)


def test_delete_patient_with_or_without_slides(project: Project, make_png, tmp_path: Path) -> None:
    a = project.add_slide(make_png(tmp_path / "a.png", seed=1), patient_id="PA", mpp=0.5)
    b = project.add_slide(make_png(tmp_path / "b.png", seed=2), patient_id="PB", mpp=0.5)
    _, fa = finished_run(project, a.slide_id)
    _, fb = finished_run(project, b.slide_id)
    project.delete_patient("PA")
    assert project.list_patients()["patient_id"].tolist() == ["PB"]
    assert project.list_slides()["slide_id"].tolist() == [b.slide_id]
    assert not project.abspath(a.path).exists() and not any(p.exists() for p in fa)
    project.delete_patient("PB", with_slides=False)  # the slide stays, without a patient
    assert project.list_patients().empty
    assert project.get_slide(b.slide_id).patient_id is None and all(p.exists() for p in fb)
    with pytest.raises(StoreError, match="no patient"):
        project.delete_patient("PB")


def test_delete_slide_removes_rows_and_files(project: Project, slide) -> None:
    _, files = finished_run(project, slide.slide_id)
    project.delete_slide(slide.slide_id)
    assert project.list_slides().empty and project.list_runs().empty
    assert not project.abspath(slide.path).exists() and not any(p.exists() for p in files)
    assert not project._conn().execute("SELECT COUNT(*) FROM result_files").fetchone()[0]
    assert project.integrity_check() == "ok"


# --- killed midway -----------------------------------------------------------------------------

def test_killed_before_commit_changes_nothing(project: Project, slide, state, monkeypatch) -> None:
    finished_run(project, slide.slide_id)
    before = state(project)

    def die(*a, **k):
        raise KeyboardInterrupt  # the process stops inside the transaction

    monkeypatch.setattr(deletions, "journal", die)
    for act in (lambda: project.delete_slide(slide.slide_id), lambda: project.update_slide(slide.slide_id, mpp=0.3)):
        with pytest.raises(KeyboardInterrupt):
            act()
        assert state(project) == before


def test_killed_after_commit_is_finished_on_open(project: Project, slide) -> None:
    _, files = finished_run(project, slide.slide_id)
    deletions.delete_slide_rows(project.db, slide.slide_id)  # step 1 only: then the process dies
    # the slide is gone for every reader at once; its files wait in the journal
    assert project.list_slides().empty and project.list_runs().empty
    assert project.abspath(slide.path).exists() and all(p.exists() for p in files)
    assert len(deletions.pending_removals(project.db)) == 1
    with Project.open(project.folder) as again:  # the next open finishes the deletion
        assert not deletions.pending_removals(again.db)
    assert not project.abspath(slide.path).exists() and not any(p.exists() for p in files)


def test_a_file_used_again_is_not_removed_by_the_sweep(project: Project, slide, make_png, tmp_path) -> None:
    deletions.delete_slide_rows(project.db, slide.slide_id)  # killed before removing the file
    again = project.add_slide(make_png(tmp_path / "he.png"), patient_id="P1", mpp=0.5)  # same bytes, same name
    assert again.path == slide.path
    Project.open(project.folder).close()
    assert project.abspath(again.path).exists() and not deletions.pending_removals(project.db)


def test_real_kill_between_the_steps(project: Project, slide, subprocess_env) -> None:
    """A child process deletes the slide and is killed (os._exit) right after the commit."""
    _, files = finished_run(project, slide.slide_id)
    code = (
        "import os, sys\n"
        "from ghist_core.project import Project, deletions\n"
        "deletions.finish_removal = lambda db, token: os._exit(9)\n"
        "p = Project.open(sys.argv[1])\n"
        "p.delete_slide(int(sys.argv[2]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(project.folder), str(slide.slide_id)],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert project.list_slides().empty and project.abspath(slide.path).exists()
    Project.open(project.folder).close()
    assert not project.abspath(slide.path).exists() and not any(p.exists() for p in files)
    assert project.integrity_check() == "ok"


# --- uploads, names, folders ---------------------------------------------------------------------

def test_upload_differences(project: Project, slide) -> None:
    assert slides.upload_differences(slide, mpp=None, patient_id="P1") == []
    assert slides.upload_differences(slide, mpp=0.5, patient_id=" P1 ") == []
    diffs = slides.upload_differences(slide, mpp=0.25, patient_id="P2")
    assert len(diffs) == 2 and "0.5" in diffs[0] and "0.25" in diffs[0] and "P2" in diffs[1]
    assert project.find_slide_for_file(project.abspath(slide.path)).slide_id == slide.slide_id


def test_messages_name_the_users_file_not_the_staged_one(project: Project, tmp_path: Path) -> None:
    staged = uploads.stage_upload("my slide.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
                                  uploads.staging_dir(project.folder))
    with pytest.raises(SlideError) as info:
        uploads.inspect_upload(staged.path, name="my slide.png")
    assert "my slide.png" in str(info.value) and staged.path.name not in str(info.value)
    with pytest.raises(SlideError) as info:
        uploads.add_staged_upload(project, staged, patient_id="P1", mpp=0.5)
    assert "my slide.png" in str(info.value) and "upload_" not in str(info.value)
    assert str(staged.path.parent) not in str(info.value)


def test_wants_run_only_without_a_finished_or_active_run(project: Project, slide) -> None:
    assert overview.wants_run(project, slide.slide_id)
    rid = project.start_run(slide.slide_id, model_id="m", weights_sha256="", device="cpu", status=RunStatus.QUEUED)
    assert not overview.wants_run(project, slide.slide_id)
    project.fail_run(rid, "x")
    assert overview.wants_run(project, slide.slide_id)
    finished_run(project, slide.slide_id)
    assert not overview.wants_run(project, slide.slide_id)


def test_project_folder_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    assert project_folder_for("study1") == tmp_path / "projects" / "study1"
    assert project_folder_for("  study 2 ") == tmp_path / "projects" / "study 2"
    assert project_folder_for(str(tmp_path / "x")) == tmp_path / "x"
    assert project_folder_for("rel/dir") == Path("rel/dir")
    assert project_folder_for("~/p") == Path.home() / "p"
    for bad in ("", "   ", "a\nb"):
        with pytest.raises(StoreError):
            project_folder_for(bad)


def test_cell_type_display_names() -> None:
    from ghist_core.viz import palette

    assert palette.cell_type_label("T") == "T cells" and palette.cell_type_label("B") == "B cells"
    assert set(palette.CELL_TYPE_LABELS) == set(palette.CELL_TYPES)
    assert palette.cell_type_label("Unknown") == "Unknown"


def test_a_slide_being_computed_cannot_be_deleted_or_rescaled(project: Project, slide, state) -> None:
    """A process holding the slide's run lock (even before its run row exists) blocks both."""
    locks = pytest.importorskip("ghist_core.project.locks")
    from ghist_core.errors import SlideBusyError

    finished_run(project, slide.slide_id)
    with locks.lock_slide(project.folder, slide.slide_id):
        before = state(project)
        for act in (lambda: project.delete_slide(slide.slide_id), lambda: project.update_slide(slide.slide_id, mpp=0.3),
                    lambda: project.delete_patient("P1"),
                    lambda: project.delete_run(int(project.list_runs()["run_id"].iloc[0]))):
            with pytest.raises(SlideBusyError):
                act()
            assert state(project) == before
        project.update_slide(slide.slide_id, patient_id="P2")  # no scale change: no lock needed
    project.delete_slide(slide.slide_id)
    assert project.list_slides().empty


def test_a_mpp_too_coarse_to_analyse_is_refused_at_upload(project: Project, make_png, tmp_path: Path) -> None:
    """5 µm/px typed for an ordinary scan would make every run fail at its first read (a 10x
    enlargement for the 0.5 µm/px segmenter): the upload card says so, naming the user's file."""
    from ghist_core.io.slide import MAX_UPSAMPLE_FACTOR
    from ghist_core.segmentation.model import default_working_mpp

    data = make_png(tmp_path / "scan.png").read_bytes()
    staged = uploads.stage_upload("my scan.png", data, uploads.staging_dir(project.folder))
    coarsest = MAX_UPSAMPLE_FACTOR * default_working_mpp()
    assert uploads.inspect_upload(staged.path, mpp=coarsest, name="my scan.png")["mpp"] == pytest.approx(coarsest)
    with pytest.raises(InvalidMppError, match="enlarge the image 10 times") as info:
        uploads.inspect_upload(staged.path, mpp=5.0, name="my scan.png")
    assert "my scan.png" in str(info.value) and staged.path.name not in str(info.value)


def test_moving_a_slide_to_another_patient_leaves_no_empty_patient(project: Project, make_png, tmp_path: Path) -> None:
    """A patient id fixed on the slide's only patient leaves no patient that counts but holds nothing;
    one that still has a slide, or attributes someone entered, stays."""
    a = project.add_slide(make_png(tmp_path / "a.png", seed=1), patient_id="P-002", mpp=0.5)
    project.update_slide(a.slide_id, patient_id="P-003")
    assert list(project.list_patients()["patient_id"]) == ["P-003"]
    b = project.add_slide(make_png(tmp_path / "b.png", seed=2), patient_id="P-003", mpp=0.5)
    project.update_slide(a.slide_id, patient_id="P-004")  # P-003 keeps slide b
    assert list(project.list_patients()["patient_id"]) == ["P-003", "P-004"]
    slides.add_patient(project.db, "P-004", stage="II")
    project.update_slide(a.slide_id, patient_id="P-005")  # P-004 has clinical attributes: kept
    assert list(project.list_patients()["patient_id"]) == ["P-003", "P-004", "P-005"]
    assert overview.summary(project).n_patients == 3


def test_an_edit_to_a_mpp_no_run_could_use_is_refused(project: Project, slide) -> None:
    """5 µm/px entered on Home would only fail at the next run (after deleting the slide's runs)."""
    rid, files = finished_run(project, slide.slide_id)
    with pytest.raises(InvalidMppError, match="coarser than the analysis can use"):
        project.plan_slide_edit(slide.slide_id, mpp=5.0)
    with pytest.raises(InvalidMppError):
        project.update_slide(slide.slide_id, mpp=5.0)
    assert project.get_slide(slide.slide_id).mpp == 0.5 and all(p.exists() for p in files)
    assert project.plan_slide_edit(slide.slide_id, mpp=2.0).new_mpp == 2.0  # the coarsest usable


def test_a_tiny_image_gets_a_note_on_the_upload_card(project: Project, make_png, tmp_path: Path) -> None:
    staged = uploads.stage_upload("crop.png", make_png(tmp_path / "crop.png", size=40).read_bytes(),
                                  uploads.staging_dir(project.folder))
    note = uploads.small_image_note(uploads.inspect_upload(staged.path, mpp=0.5))
    assert note is not None and "20 × 20 µm" in note
    big = uploads.stage_upload("big.png", make_png(tmp_path / "big.png", size=400).read_bytes(),
                               uploads.staging_dir(project.folder))
    assert uploads.small_image_note(uploads.inspect_upload(big.path, mpp=0.5)) is None  # 200 µm
