"""Resource limits checked before work (issue #20, points 3 and 4): XLSX read in bounded
memory whatever its declared size, CSV delimiter guessed on a bounded sample, the
proportional-hazards check bounded, and a slide's block plan capped before a run is recorded."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from ghist_core.analysis import clinical
from ghist_core.analysis.clinical import read_clinical_table
from ghist_core.analysis.survival import PH_MAX_N, fit_cox, ph_check
from ghist_core.errors import ClinicalTableError, InvalidMppError, PipelineLimitError
from ghist_core.pipeline.blocks import MAX_PLANNED_BLOCKS, PipelineConfig, check_block_plan

REPO = Path(__file__).resolve().parents[2]

#: Peak resident memory allowed for reading the 1.6 KB XFD1048576 workbook, in a fresh
#: interpreter that also imports pandas and openpyxl (about 110 MB of it). Before: > 8.9 GB.
XLSX_BOMB_PEAK_MB = 300


def _table_rows(n: int = 30) -> list[list]:
    return [["patient_id", "os_days", "vital_status"]] + [
        [f"P{i:03d}", 10 + 7 * i, "dead" if i % 3 == 0 else "alive"] for i in range(n)]


def xlsx_with_far_cell(value="x", *, cell: str = "XFD1048576", styled_only: bool = False) -> bytes:
    """A small table plus one cell far away, so the sheet declares A1:<cell>."""
    wb = openpyxl.Workbook()
    ws = wb.active
    for r in _table_rows():
        ws.append(r)
    if styled_only:
        ws[cell].font = openpyxl.styles.Font(bold=True)  # written, but holds no value
    else:
        ws[cell] = value
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- XLSX
def test_xlsx_declaring_xfd1048576_is_refused_in_bounded_memory(tmp_path):
    data = xlsx_with_far_cell()
    assert b"XFD1048576" in _sheet_xml(data) and len(data) < 8000
    path = tmp_path / "bomb.xlsx"
    path.write_bytes(data)
    code = textwrap.dedent(f"""
        import resource, sys
        from ghist_core.analysis.clinical import read_clinical_table
        from ghist_core.errors import ClinicalTableError
        try:
            read_clinical_table({str(path)!r})
            print("READ")
        except ClinicalTableError as e:
            print("TYPED", e)
        # VmHWM, not ru_maxrss: rusage survives execve, so a child of a big pytest process would
        # report the parent's resident size as its own peak
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
        print("PEAK_MB", int(hwm) / 1024)
    """)
    # address space capped too: a regression dies here instead of swapping the machine
    out = subprocess.run([sys.executable, "-c", "import resource; lim = 3 * 2**30; "
                          "resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); exec(open(0).read())"],
                         input=code, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TYPED" in out.stdout and "column XFD" in out.stdout and "row 1048576" in out.stdout
    peak = float(out.stdout.split("PEAK_MB")[1])
    assert peak < XLSX_BOMB_PEAK_MB, f"peak {peak:.0f} MB"


def _sheet_xml(data: bytes) -> bytes:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read("xl/worksheets/sheet1.xml")


def test_xlsx_stray_empty_cell_far_away_is_ignored():
    df = read_clinical_table(xlsx_with_far_cell(styled_only=True), "styled.xlsx")
    assert df.shape == (30, 3) and list(df.columns) == ["patient_id", "os_days", "vital_status"]
    assert df["os_days"].tolist() == [10 + 7 * i for i in range(30)]


def test_xlsx_value_below_the_row_limit_is_refused(monkeypatch):
    monkeypatch.setattr(clinical, "_MAX_ROWS", 100)
    with pytest.raises(ClinicalTableError, match=r"row 5,000, beyond the 100-patient limit"):
        read_clinical_table(xlsx_with_far_cell(cell="A5000"), "long.xlsx")
    # within the limit, the empty rows between are skipped
    df = read_clinical_table(xlsx_with_far_cell(cell="A90"), "ok.xlsx")
    assert len(df) == 31 and df["patient_id"].iloc[-1] == "x"


def test_xlsx_cell_limit(monkeypatch):
    monkeypatch.setattr(clinical, "_MAX_CELLS", 50)
    with pytest.raises(ClinicalTableError, match="more than 50 cells"):
        read_clinical_table(xlsx_with_far_cell(cell="B3"), "cells.xlsx")


def test_xlsx_unpacking_to_more_than_the_limit_is_refused(monkeypatch):
    monkeypatch.setattr(clinical, "_MAX_XLSX_UNPACKED", 10_000)
    with pytest.raises(ClinicalTableError, match="unpacks to"):
        read_clinical_table(xlsx_with_far_cell(cell="C2"), "zip.xlsx")


# --------------------------------------------------------------------------- CSV sniffing
@pytest.mark.parametrize("delim", [",", ";", "\t", "|"])
def test_sniffer_on_large_quote_heavy_input_is_bounded_and_right(delim):
    # many quoted fields holding the other delimiters: csv.Sniffer's regexes were quadratic
    # on this (24 KB -> 4.9 s, 180 KB > 150 s)
    others = "".join(d for d in ",;\t|" if d != delim)
    row = delim.join([f'"a{others}b"', "12", f'"x{others}"', "dead"])
    text = delim.join(["id", "time", "note", "status"]) + "\n" + "\n".join([row] * 8000) + "\n"
    assert len(text) > 180_000
    t = time.perf_counter()
    assert clinical._sniff_delimiter(text) == delim
    df = read_clinical_table(text.encode(), "q.csv")
    elapsed = time.perf_counter() - t
    assert df.shape == (8000, 4) and df.attrs["delimiter"] == delim
    print(f"{len(text) / 1024:.0f} KB sniffed and read in {elapsed:.2f} s")


def test_sniffer_looks_only_at_the_start():
    head = "a;b;c\n" + "1;2;3\n" * 20_000  # > 64 KB of semicolon table
    tail = "x,y,z,w,v,u\n" * 20_000
    assert clinical._sniff_delimiter(head + tail) == ";"
    assert clinical._sniff_delimiter('"' * 180_000) == ","  # one unterminated quote: a single field


def test_too_many_csv_rows_are_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(clinical, "_MAX_ROWS", 1000)
    text = "id,t,e\n" + "".join(f"P{i},{i},1\n" for i in range(1001))
    with pytest.raises(ClinicalTableError, match="more than 1,000 lines"):
        read_clinical_table(text.encode(), "long.csv")
    assert len(read_clinical_table(("id,t,e\n" + "".join(f"P{i},{i},1\n" for i in range(999))).encode(),
                                   "ok.csv")) == 999


# --------------------------------------------------------------------------- PH check
def _cox_table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"T": rng.exponential(10 * np.exp(-0.5 * x)).round(1) + 0.1,
                         "E": (rng.random(n) < 0.7).astype(int), "x": x,
                         "g": np.where(rng.random(n) < 0.5, "a", "b")})


def test_ph_check_small_data_is_lifelines_own_test():
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    d = _cox_table(300)
    d["g"] = (d["g"] == "b").astype(float)
    cph = CoxPHFitter().fit(d, "T", "E")
    ours = ph_check(cph, d, "T", "E", ["x", "g"], label="m")
    ref = proportional_hazard_test(cph, d, time_transform="rank").summary
    assert "subsample" not in ours.attrs and "error" not in ours.attrs
    np.testing.assert_allclose(ours["test_statistic"].to_numpy(), ref["test_statistic"].to_numpy())


def test_ph_check_above_the_bound_runs_on_a_stated_subsample():
    from lifelines import CoxPHFitter

    d = _cox_table(3000)
    d["g"] = (d["g"] == "b").astype(float)
    cph = CoxPHFitter().fit(d, "T", "E")
    res = ph_check(cph, d, "T", "E", ["x", "g"], max_n=500)
    assert res.attrs["subsample"] == {"n": 500, "of": 3000, "seed": 0}
    assert np.isfinite(res["p"]).all() and sorted(res["covariate"]) == ["g", "x"]
    again = ph_check(cph, d, "T", "E", ["x", "g"], max_n=500)
    assert again["test_statistic"].tolist() == res["test_statistic"].tolist()  # seeded: reproducible


def test_fit_cox_says_when_the_ph_check_was_subsampled(monkeypatch):
    import ghist_core.analysis.survival as survival

    assert PH_MAX_N >= 10_000
    monkeypatch.setattr(survival, "PH_MAX_N", 400)
    res = fit_cox(_cox_table(1000), "T", "E", ["x", "g"])
    assert res.ph_check.attrs["subsample"]["of"] == 1000
    assert any("subsample of 400 of 1,000 patients" in n for n in res.notes)
    uni = fit_cox(_cox_table(1000), "T", "E", ["x", "g"], univariate=True)
    assert any("subsample" in n for n in uni.notes) and len(uni.ph_check) == 2


# --------------------------------------------------------------------------- block plan
def test_block_plan_refuses_implausible_mpp_and_too_many_blocks():
    cfg = PipelineConfig()
    with pytest.raises(InvalidMppError, match="250"):
        check_block_plan(2220, 2967, 250.0, cfg)  # `--mpp 250` on the demo: 592,569 blocks before
    with pytest.raises(PipelineLimitError, match=r"50 µm per pixel.*62,930 blocks"):
        check_block_plan(2220, 2967, 50.0, cfg)
    assert check_block_plan(2220, 2967, 0.499, cfg) == 9  # the demo slide as scanned
    # a 75 x 25 mm slide at 0.25 µm/px is far inside the limit
    assert check_block_plan(300_000, 100_000, 0.25, cfg) < MAX_PLANNED_BLOCKS / 5
    with pytest.raises(PipelineLimitError, match="block size"):
        check_block_plan(1000, 1000, 0.5, PipelineConfig(block_um=1.0))


def test_predict_slide_refuses_the_plan_before_recording_a_run(tmp_path, small_slide_png, tiny_ghist, monkeypatch):
    import ghist_core.pipeline.blocks as blocks
    from ghist_core.project.store import Project

    project = Project.create(tmp_path / "proj")
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=0.499)
    monkeypatch.setattr(blocks, "MAX_PLANNED_BLOCKS", 3)
    with pytest.raises(PipelineLimitError, match="0.499 µm per pixel"):
        blocks.predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                             device="cpu", config=PipelineConfig(block_um=64.0))
    assert project.latest_run(record.slide_id) is None
    assert not (project.folder / "runs").exists() or not any((project.folder / "runs").iterdir())


def test_a_run_refused_for_its_mpp_names_the_users_file_and_where_to_fix_it(tmp_path, small_slide_png, tiny_ghist):
    """The project stores ``<hash>_<name>``; a run's message names the file as uploaded and says where
    a slide's µm/px is corrected, and no run is recorded."""
    from ghist_core.errors import InvalidMppError
    import ghist_core.pipeline.blocks as blocks
    from ghist_core.project.store import Project

    project = Project.create(tmp_path / "proj")
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=5.0, original_name="tumour 7.png")
    stored = project.slide_path(record.slide_id).name
    assert stored != "tumour 7.png"
    with pytest.raises(InvalidMppError) as info:
        blocks.predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id=None, device="cpu")
    assert "'tumour 7.png' is 5 µm per pixel" in str(info.value) and stored not in str(info.value)
    assert "Home, Edit or delete" in str(info.value)
    assert project.latest_run(record.slide_id) is None
