"""Home and Upload under AppTest (#19.6, #19.8): edit µm/px and patient, delete with confirmation,
re-uploads that differ, plain project names, no 'None', no temporary file names, the µm/px prompt."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import apptest_kit as kit
from apptest_kit import REPO
from ghist_core.project import Project, overview

#: how a staged upload is named on disk (uploads.stage_upload); the user must never see it
STAGED_NAME = re.compile(r"upload_\w+\.png")


def png_bytes(seed: int = 0, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def open_page(page: str, folder: Path) -> AppTest:
    return kit.open_page(page, {"project_dir": str(folder)})


def finished_run(project: Project, slide_id: int) -> int:
    rid = project.start_run(slide_id, model_id="m", weights_sha256="", device="cpu")
    out = project.folder / "results" / f"slide_{slide_id}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"run_{rid}.h5ad").write_bytes(b"result")
    project.add_result_file(rid, "h5ad", out / f"run_{rid}.h5ad")
    project.finish_run(rid, n_cells=1234)
    return rid


@pytest.fixture
def proj(tmp_path) -> Project:
    """Two patients: P1's slide has a finished run, P2's slide was never run."""
    p = Project.open_or_create(tmp_path / "p")
    a = tmp_path / "a.png"
    a.write_bytes(png_bytes(1))
    b = tmp_path / "b.png"
    b.write_bytes(png_bytes(2))
    sa = p.add_slide(a, patient_id="P1", mpp=0.5)
    p.add_slide(b, patient_id="P2", mpp=0.5)
    finished_run(p, sa.slide_id)
    yield p
    p.close()


def unescaped(text) -> str:
    """A message as the user reads it (markdown escapes of ``safe_text.plain`` removed)."""
    return re.sub(r"\\(.)", r"\1", str(text))


def said(at: AppTest, kind: str) -> list[str]:
    return [unescaped(e.value) for e in at.get(kind)]


def texts(at: AppTest) -> str:
    return " ".join(t for kind in ("markdown", "success", "info", "warning", "error", "caption") for t in said(at, kind))


def button(at: AppTest, label: str):
    return [b for b in at.button if b.label == label][0]


def field(at: AppTest, kind: str, label: str):
    """The one widget of ``kind`` labelled ``label`` (keys are the page's business)."""
    return [w for w in at.get(kind) if w.label == label][0]


# --- Home --------------------------------------------------------------------------------------

def test_plain_project_name_goes_under_the_projects_folder(projects, tmp_path):
    at = open_page("pages/home.py", projects / "demo")
    at.text_input(key="home_project_folder").set_value("study1")
    at.button(key="home_open_project").click().run()
    assert not at.exception
    assert at.session_state["project_dir"] == str(projects / "study1")
    assert (projects / "study1" / "project.sqlite").is_file()
    assert not (REPO / "study1").exists()  # never inside the code folder
    # a path stays a path
    at.text_input(key="home_project_folder").set_value(str(tmp_path / "elsewhere"))
    at.button(key="home_open_project").click().run()
    assert at.session_state["project_dir"] == str(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "project.sqlite").is_file()


def test_home_table_says_not_run_yet_instead_of_none(projects, proj):
    at = open_page("pages/home.py", proj.folder)
    table = at.dataframe[0].value
    assert table["status" if "status" in table else "prediction"].tolist() == ["finished", overview.NOT_RUN]
    assert table["cells"].tolist() == ["1,234", overview.NONE_TEXT]
    shown = table.drop(columns=["thumbnail"], errors="ignore")
    assert not shown.isna().any().any()
    assert "None" not in {str(v) for v in shown.to_numpy().ravel()}


def test_edit_mpp_asks_then_deletes_the_runs_and_says_so(projects, proj):
    sid = int(proj.list_slides()["slide_id"].iloc[0])
    at = open_page("pages/home.py", proj.folder)
    field(at, "selectbox", "Slide").set_value(sid).run()
    field(at, "number_input", "µm per pixel").set_value(0.25).run()
    at.button(key="home_save_slide").click().run()
    assert not at.exception
    # a question first, naming the consequence; nothing changed yet
    assert any("1 run" in w and "deleted" in w for w in said(at, 'warning'))
    assert proj.get_slide(sid).mpp == 0.5 and len(proj.list_runs(sid)) == 1
    at.button(key="home_confirm_yes").click().run()
    assert not at.exception
    assert proj.get_slide(sid).mpp == 0.25 and proj.list_runs(sid).empty
    assert any("1 run was deleted" in s and "0.5 µm/px" in s for s in said(at, 'success'))
    assert at.dataframe[0].value["prediction"].tolist()[0] == overview.NOT_RUN
    assert overview.finished_slides(proj).empty


def test_edit_patient_only_needs_no_confirmation(projects, proj):
    sid = int(proj.list_slides()["slide_id"].iloc[0])
    at = open_page("pages/home.py", proj.folder)
    field(at, "selectbox", "Slide").set_value(sid).run()
    field(at, "text_input", "Patient id").set_value("P7").run()
    at.button(key="home_save_slide").click().run()
    assert not at.exception
    assert proj.get_slide(sid).patient_id == "P7" and len(proj.list_runs(sid)) == 1
    assert any("P7" in s for s in said(at, 'success'))


def test_delete_slide_run_and_patient_with_confirmation(projects, proj):
    slides = proj.list_slides()
    s1, s2 = (int(x) for x in slides["slide_id"])
    at = open_page("pages/home.py", proj.folder)
    # delete slide 2: Cancel keeps it, the confirm button deletes it
    field(at, "selectbox", "Slide").set_value(s2).run()
    at.button(key="home_delete_slide").click().run()
    assert any(f"Delete slide {s2}" in w for w in said(at, 'warning'))
    at.button(key="home_confirm_no").click().run()
    assert len(proj.list_slides()) == 2
    at.button(key="home_delete_slide").click().run()
    at.button(key="home_confirm_yes").click().run()
    assert not at.exception
    assert proj.list_slides()["slide_id"].tolist() == [s1]
    assert any(f"Slide {s2} deleted" in s for s in said(at, 'success'))
    # delete the run of slide 1
    rid = int(proj.list_runs(s1)["run_id"].iloc[0])
    field(at, "selectbox", "Slide").set_value(s1).run()
    at.button(key="home_delete_run").click().run()
    assert any(f"run {rid}" in w for w in said(at, 'warning'))
    at.button(key="home_confirm_yes").click().run()
    assert proj.list_runs().empty and not (proj.folder / "results" / f"slide_{s1}").exists()
    # delete patient P1 with their slide
    field(at, "selectbox", "Patient").set_value("P1").run()
    at.button(key="home_delete_patient").click().run()
    assert any("Delete patient P1" in w and "1 slide" in w for w in said(at, 'warning'))
    at.button(key="home_confirm_yes").click().run()
    assert not at.exception
    assert proj.list_slides().empty and "P1" not in proj.list_patients()["patient_id"].tolist()
    assert not list((proj.folder / "slides").iterdir())


def study_with_slide_1(projects: Path, tmp_path: Path) -> Project:
    """Project ``study1`` whose slide 1 (patient P-001, 0.5 µm/px, one finished run) shares its id with
    the demo's slide 1 (DEMO-01, 0.499 µm/px)."""
    study = Project.open_or_create(projects / "study1")
    src = tmp_path / "tiatoolbox_target_image.png"
    src.write_bytes(png_bytes(3))
    rec = study.add_slide(src, patient_id="P-001", mpp=0.5)
    finished_run(study, rec.slide_id)
    return study


def test_edit_form_shows_the_open_projects_slide_not_the_last_ones_with_that_id(projects, tmp_path):
    """Keys holding only the slide id kept the demo's slide 1 values in study1's slide 1 form, and an
    untouched Save offered to write them over study1's slide (deleting its run)."""
    study = study_with_slide_1(projects, tmp_path)
    at = kit.open_page("pages/home.py")  # the demo: its slide 1 in the form
    assert field(at, "number_input", "µm per pixel").value == pytest.approx(0.499, abs=1e-3)
    assert field(at, "text_input", "Patient id").value == "DEMO-01"
    at.text_input(key="home_project_folder").set_value("study1")
    at.button(key="home_open_project").click().run()
    assert not at.exception
    assert at.session_state["project_dir"] == str(projects / "study1")
    assert field(at, "selectbox", "Slide").value == 1
    assert field(at, "number_input", "µm per pixel").value == pytest.approx(0.5)
    assert field(at, "text_input", "Patient id").value == "P-001"
    button(at, "Save changes").click().run()
    assert not at.exception
    assert "Nothing to change." in said(at, "info")
    assert not any("deleted" in w for w in said(at, "warning"))
    assert study.get_slide(1).mpp == 0.5 and study.get_slide(1).patient_id == "P-001"
    assert len(study.list_runs(1)) == 1


def test_switching_project_drops_a_pending_question(projects, tmp_path):
    """A question asked in one project ("update slide 1 and delete its runs?") is never answered in the next."""
    study_with_slide_1(projects, tmp_path)
    at = open_page("pages/home.py", projects / "study1")
    field(at, "number_input", "µm per pixel").set_value(0.25).run()
    button(at, "Save changes").click().run()
    assert at.button(key="home_confirm_yes").label == "Update slide 1 and delete its runs"
    at.button(key="home_demo_project").click().run()
    assert not at.exception
    assert at.session_state["project_dir"] == str(projects / "demo")
    assert not [b for b in at.button if b.key == "home_confirm_yes"]
    assert not any("delete its runs" in w for w in said(at, "warning"))
    demo = Project.open(projects / "demo")
    assert demo.get_slide(1).mpp == pytest.approx(0.499, abs=1e-3)


# --- Upload ------------------------------------------------------------------------------------

def upload_png(at: AppTest, name: str, data: bytes) -> None:
    at.get("file_uploader")[0].upload(name, data, "image/png").run()
    assert not at.exception, [e.value for e in at.exception]


def test_mpp_prompt_goes_once_answered_and_no_temp_names(projects, tmp_path):
    at = open_page("pages/upload.py", tmp_path / "up")
    upload_png(at, "scan 7.png", png_bytes(5))
    assert at.warning and "scan 7.png" in said(at, "warning")[0]
    assert not STAGED_NAME.search(texts(at))
    mpp = [n for n in at.number_input if "µm per pixel" in n.label][0]
    mpp.set_value(0.5).run()
    assert not at.exception
    assert not [n for n in at.number_input if "µm per pixel" in n.label]  # the prompt is gone
    assert not any("µm/px" in w for w in said(at, 'warning'))  # the question is gone
    assert any("room for a few cells" in w for w in said(at, 'warning'))  # 96 px at 0.5 µm/px: 48 µm
    assert "0.5000 µm per px (given)" in texts(at)
    assert not STAGED_NAME.search(texts(at))
    # the answer can be changed: the prompt comes back
    button(at, "Change µm per pixel").click().run()
    assert [n for n in at.number_input if "µm per pixel" in n.label]


def upload_again(tmp_path: Path, name: str, *, seed: int):
    """A project holding ``name`` (patient P1, 0.5 µm/px, one finished run), and the Upload page with
    the same file uploaded again: ``(project, record, at)``."""
    data = png_bytes(seed)
    project = Project.open_or_create(tmp_path / "up")
    src = tmp_path / name
    src.write_bytes(data)
    rec = project.add_slide(src, patient_id="P1", mpp=0.5, original_name=name)
    finished_run(project, rec.slide_id)
    at = open_page("pages/upload.py", tmp_path / "up")
    upload_png(at, name, data)
    # the project knows this PNG's µm/px: shown, not asked again; "Change" brings the question back
    assert not [n for n in at.number_input if "µm per pixel" in n.label]
    assert "0.5000 µm per px (given)" in texts(at)
    button(at, "Change µm per pixel").click().run()
    return project, rec, at


def test_bad_upload_message_names_the_users_file(projects, tmp_path):
    at = open_page("pages/upload.py", tmp_path / "up")
    upload_png(at, "biopsy.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert at.error and "biopsy.png" in said(at, "error")[0]
    assert not STAGED_NAME.search(texts(at)) and "ghist-uploads" not in texts(at)


def test_reupload_with_another_mpp_asks_and_updates(projects, tmp_path):
    project, rec, at = upload_again(tmp_path, "slide.png", seed=9)
    assert f"Already in the project as slide {rec.slide_id}" in texts(at)
    [n for n in at.number_input if "µm per pixel" in n.label][0].set_value(0.25).run()
    assert [t for t in at.text_input if t.label == "Patient id"][0].value == "P1"  # the slide's patient
    [cb for cb in at.checkbox if cb.label.startswith("Run the prediction")][0].set_value(False)
    button(at, "Add to project").click().run()
    assert not at.exception
    # asked, not silently reused; nothing changed yet
    assert any("already in the project" in w and "0.25" in w and "1 run" in w for w in said(at, 'warning'))
    assert project.get_slide(rec.slide_id).mpp == 0.5 and len(project.list_runs()) == 1
    button(at, f"Update slide {rec.slide_id}").click().run()
    assert not at.exception
    assert project.get_slide(rec.slide_id).mpp == 0.25 and project.list_runs().empty
    assert len(project.list_slides()) == 1
    assert any("updated" in s and "1 earlier run deleted" in s for s in said(at, 'success'))


def test_reupload_with_another_patient_can_be_kept_and_starts_no_redundant_run(projects, tmp_path):
    project, rec, at = upload_again(tmp_path, "s.png", seed=11)
    [n for n in at.number_input if "µm per pixel" in n.label][0].set_value(0.5).run()
    [t for t in at.text_input if t.label == "Patient id"][0].set_value("P2").run()
    button(at, "Add to project").click().run()  # "run right away" stays ticked
    assert any("patient id" in w and "P2" in w for w in said(at, 'warning'))
    button(at, "Keep the slide as it is").click().run()
    assert not at.exception
    assert project.get_slide(rec.slide_id).patient_id == "P1"
    assert len(project.list_runs()) == 1  # the finished run is reused, no second run
    assert any("kept as it was" in i for i in said(at, 'info'))


def test_upload_is_staged_and_the_uploader_emptied_then_remove_deletes_it(projects, tmp_path):
    """The uploader is an inbox: a file goes to a staging file on disk and out of Streamlit's memory
    (a fresh, empty uploader), its card stays; "Remove" deletes the staged copy and the card."""
    from ghist_core.project.uploads import staging_dir

    at = open_page("pages/upload.py", tmp_path / "up")
    upload_png(at, "scan 8.png", png_bytes(8))
    staged = list(staging_dir(tmp_path / "up").glob("upload_*"))
    assert len(staged) == 1 and staged[0].read_bytes() == png_bytes(8)
    assert not at.get("file_uploader")[0].value  # the fresh uploader holds nothing
    assert "scan 8.png" in texts(at)
    button(at, "Remove").click().run()
    assert not at.exception
    assert not staged[0].exists() and "scan 8.png" not in texts(at)
    # the next upload works in the new uploader
    upload_png(at, "scan 9.png", png_bytes(9))
    assert "scan 9.png" in texts(at) and len(list(staging_dir(tmp_path / "up").glob("upload_*"))) == 1


def test_an_upload_question_stays_with_its_project(projects, tmp_path):
    """"Update slide 1?" asked in study1 is not shown in another project (its slide 1 is another slide:
    answering there changed the demo's slide and deleted its run); back in study1 it is still asked."""
    data = png_bytes(21)
    study = Project.open_or_create(projects / "study1")
    src = tmp_path / "slide.png"
    src.write_bytes(data)
    rec = study.add_slide(src, patient_id="P1", mpp=0.5, original_name="slide.png")
    finished_run(study, rec.slide_id)
    at = open_page("pages/upload.py", projects / "study1")
    upload_png(at, "slide.png", data)
    button(at, "Change µm per pixel").click().run()
    [n for n in at.number_input if "µm per pixel" in n.label][0].set_value(0.25).run()
    [cb for cb in at.checkbox if cb.label.startswith("Run the prediction")][0].set_value(False)
    button(at, "Add to project").click().run()
    assert [b for b in at.button if b.label == f"Update slide {rec.slide_id}"]
    at.session_state["project_dir"] = str(projects / "demo")  # the sidebar's project switch
    at.run()
    assert not at.exception
    assert not [b for b in at.button if b.label.startswith("Update slide")]
    assert not any("already in the project" in w for w in said(at, "warning"))
    assert Project.open(projects / "demo").get_slide(1).mpp == pytest.approx(0.499, abs=1e-3)
    at.session_state["project_dir"] = str(projects / "study1")
    at.run()
    assert [b for b in at.button if b.label == f"Update slide {rec.slide_id}"]
    assert study.get_slide(rec.slide_id).mpp == 0.5


def test_a_cancelled_run_says_it_was_cancelled_and_what_resume_does(projects, proj):
    sid = int(proj.list_slides()["slide_id"].iloc[1])  # P2's slide: never run
    rid = proj.start_run(sid, model_id="m", weights_sha256="", device="cpu")
    proj.update_run(rid, stage="segment+predict", progress=0.5, message="block 3 of 6: 256 cells")
    proj.cancel_run(rid)
    at = open_page("pages/upload.py", proj.folder)
    assert not at.exception
    box = [w for w in said(at, "warning") if "Cancelled" in w]
    assert box and "block 3 of 6: 256 cells" in box[0] and "Resume continues" in box[0]
    assert [b for b in at.button if b.label == "Resume"]
