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
    assert "error: input 1: " in out.stderr and "Traceback" not in out.stderr
    assert "notes" not in out.stderr  # named by position, never by file name (docs/SECURITY.md §3)


@pytest.mark.parametrize("mpp", ["1e6", "1e-6", "nan", "-0.5", "0"])
def test_bad_mpp_is_refused_before_anything_is_written(tmp_path, mpp):
    slide = tmp_path / "Jane_Doe_1970-01-01.png"
    slide.write_bytes(b"not even read")
    out = _ghist("predict", str(slide), "--project", str(tmp_path / "proj"), f"--mpp={mpp}")
    assert out.returncode == EXIT_INPUT, out.stderr
    assert "--mpp" in out.stderr and "Traceback" not in out.stderr and "MemoryError" not in out.stderr
    assert not (tmp_path / "proj").exists()  # no project, no slide, no recorded value


def test_project_that_is_a_file_is_a_plain_error(tmp_path):
    afile = tmp_path / "hostname"
    afile.write_text("host\n")
    out = _ghist("predict", str(tmp_path / "x.png"), "--project", str(afile))
    assert out.returncode == EXIT_INPUT
    assert "is a file, not a folder" in out.stderr and "Traceback" not in out.stderr
    out = _ghist("predict", str(tmp_path / "x.png"), "--project", str(afile / "sub"))
    assert out.returncode == EXIT_INPUT and "Traceback" not in out.stderr


def test_patient_and_mpp_of_a_known_slide_are_not_silently_ignored(tmp_path):
    """A slide already in the project keeps its patient and scale: a different --patient/--mpp is refused."""
    import numpy as np
    from PIL import Image

    from ghist_core.project import Project

    png = tmp_path / "s.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    with Project.create(tmp_path / "proj") as project:
        rec = project.add_slide(png, patient_id="P-0001", mpp=0.5)
    for flags, word in ((["--patient", "P-0002"], "--patient"), (["--mpp", "0.25"], "--mpp")):
        out = _ghist("predict", str(png), "--project", str(tmp_path / "proj"), *flags)
        assert out.returncode == EXIT_INPUT, out.stderr
        assert f"slide {rec.slide_id}" in out.stderr and word in out.stderr and "not applied" in out.stderr
        assert "P-0001" not in out.stderr and "P-0002" not in out.stderr
    with Project.open(tmp_path / "proj") as project:
        same = project.get_slide(rec.slide_id)
        assert (same.patient_id, same.mpp) == ("P-0001", 0.5) and project.list_runs().empty


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("slide_path,patient_id,mpp\nslides/a.svs,P1,\n/abs/b.png,P2,0.5\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert rows[0].slide_path == str(tmp_path / "slides" / "a.svs") and rows[0].mpp is None
    assert rows[1].slide_path == "/abs/b.png" and rows[1].mpp == 0.5 and rows[1].patient_id == "P2"
    (tmp_path / "bad.csv").write_text("path,patient\nx,y\n")
    with pytest.raises(ClinicalTableError, match="slide_path"):
        read_manifest(tmp_path / "bad.csv")


def test_predict_help_describes_uncertainty(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--uncertainty" in help_text and "several members" in help_text and "3x the expression step" in help_text


def test_predict_uncertainty_with_a_one_member_model_goes_on_with_a_note(tmp_path, small_slide_png, tiny_ghist, capsys):
    """``--uncertainty`` on a model without ensemble members: the run finishes without the column and says why."""
    import json

    import anndata as ad

    from ghist_core import _keys as K
    from ghist_core.cli import EXIT_OK
    from ghist_core.project import Project

    argv = ["predict", str(small_slide_png), "--project", str(tmp_path / "proj"), "--mpp", "0.499",
            "--model", str(tiny_ghist), "--segmenter", "classical", "--device", "cpu", "--uncertainty"]
    for action in ("new", "existing"):  # asked again: the run that asked for it answers (no pointless rerun)
        assert main(argv) == EXIT_OK
        out, err = capsys.readouterr()
        line = json.loads(out.strip().splitlines()[-1])
        assert line["action"] == action and line["uncertainty"] == "unavailable: the model has one member"
        assert "nuclei_rescaled" not in line  # the classical segmenter has no scale check
        assert f"note: slide {line['slide_id']}: no expression uncertainty: unavailable: the model has one member" in err
        assert "Traceback" not in err
    assert K.OBS_EXPRESSION_UNCERTAINTY not in ad.read_h5ad(line["h5ad"]).obs
    with Project.open(tmp_path / "proj") as project:
        assert project.get_run(line["run_id"]).params["pipeline"]["uncertainty"] is True

    assert main(argv[:-1]) == EXIT_OK  # without the option: the same run, no note
    out, err = capsys.readouterr()
    plain = json.loads(out.strip().splitlines()[-1])
    assert plain["run_id"] == line["run_id"] and "uncertainty" not in plain and "note:" not in err


def _enlarged_predict_argv(tmp_path, small_slide_png) -> list[str]:
    """``ghist predict`` of the demo tissue enlarged 2x but given at 0.499 µm/px (nuclei look twice their
    size), with a tiny model that reads the learned segmenter's type probabilities."""
    from PIL import Image
    from testkit import make_tiny_ghist

    big = tmp_path / "enlarged.png"
    with Image.open(small_slide_png) as im:
        im.convert("RGB").resize((im.width * 2, im.height * 2), Image.Resampling.BILINEAR).save(big)
    model = tmp_path / "typed_model"
    make_tiny_ghist(model, cell_inputs=("prob_other", "prob_inflammatory", "prob_epithelial", "prob_spindle-shaped"),
                    tissue_skip=True)
    return ["predict", str(big), "--project", str(tmp_path / "proj"), "--mpp", "0.499", "--model", str(model),
            "--device", "cpu"]


def test_predict_says_when_nuclei_looked_large(tmp_path, small_slide_png, capsys):
    """The demo tissue enlarged 2x but given at 0.499 µm/px (nuclei look twice their size): the learned
    segmenter's scale check segments most of them at a smaller scale, the JSON line gives the share
    and stderr says to check the µm per pixel."""
    import json

    from ghist_core.cli import EXIT_OK

    argv = _enlarged_predict_argv(tmp_path, small_slide_png)
    assert main(argv) == EXIT_OK
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert line["nuclei_rescaled"] > 0.5
    assert f"note: slide {line['slide_id']}: " in err and "0.499 µm per pixel" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["big", "0", "nan", "100"])
def test_a_bad_nucleus_scale_is_refused_before_anything_is_written(tmp_path, small_slide_png, value, capsys):
    from ghist_core.cli import EXIT_INPUT

    project = tmp_path / "proj"
    assert main(["predict", str(small_slide_png), "--project", str(project), "--nucleus-scale", value]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "--nucleus-scale" in err or "nucleus_scale" in err
    assert "Traceback" not in err and not project.exists()


def test_predict_nucleus_scale_turns_the_check_off_and_is_part_of_a_runs_settings(tmp_path, small_slide_png, capsys):
    """``--nucleus-scale 1`` on the 2x-enlarged demo tissue: no nucleus is moved and the run records
    1.0; asking again without the option reuses it; asking for "auto" does not (another setting):
    a new run, in which most nuclei are segmented at the smaller scale."""
    import json

    import anndata as ad
    from ghist_core.cli import EXIT_OK

    argv = _enlarged_predict_argv(tmp_path, small_slide_png)

    def predict(*extra):
        assert main(argv + list(extra)) == EXIT_OK
        out, err = capsys.readouterr()
        return json.loads(out.strip().splitlines()[-1]), err

    off, err = predict("--nucleus-scale", "1")
    assert off["action"] == "new" and off["nucleus_scale"] == 1.0 and "nuclei_rescaled" not in off
    assert "note:" not in err
    uns = ad.read_h5ad(off["h5ad"]).uns["ghist"]["nucleus_scale"]
    assert uns["setting"] == 1.0
    again, _ = predict()
    assert again["action"] == "existing" and again["run_id"] == off["run_id"] and again["nucleus_scale"] == 1.0
    auto, err = predict("--nucleus-scale", "auto")
    assert auto["action"] == "new" and auto["run_id"] != off["run_id"]
    assert auto["nucleus_scale"] == "auto" and auto["nuclei_rescaled"] > 0.5 and "0.499 µm per pixel" in err


def test_a_fixed_factor_is_reported_as_set_not_as_the_checks_finding(tmp_path, small_slide_png, capsys):
    """``--nucleus-scale 0.8``: every nucleus is segmented at 0.8, which the user asked for: the JSON
    line gives the setting and no share of "looked large" nuclei, and no note suggests a wrong µm/px."""
    import json

    from testkit import make_tiny_ghist

    from ghist_core.cli import EXIT_OK

    model = tmp_path / "typed_model"
    make_tiny_ghist(model, cell_inputs=("prob_other", "prob_inflammatory", "prob_epithelial", "prob_spindle-shaped"),
                    tissue_skip=True)
    argv = ["predict", str(small_slide_png), "--project", str(tmp_path / "proj"), "--mpp", "0.499", "--model",
            str(model), "--device", "cpu", "--nucleus-scale", "0.8"]
    assert main(argv) == EXIT_OK
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert line["nucleus_scale"] == 0.8 and "nuclei_rescaled" not in line and "note:" not in err
