"""Clinical table import, mapping guesses, validation and safe export (ghist_core.analysis.clinical)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from ghist_core.analysis import clinical
from ghist_core.analysis.clinical import DEMO_CLINICAL_CSV, ColumnMapping, coerce_events, find_endpoints, guess_mapping

from ghist_core.errors import ClinicalTableError


def test_demo_table_matches_shared_copy(shared_data):
    """The bundled demo CSV is the shared TCGA table, byte for byte."""
    assert DEMO_CLINICAL_CSV.read_bytes() == (
        shared_data / "clinical" / "tcga_brca_clinical.csv").read_bytes()


def test_demo_guess_and_validate():
    df = clinical.load_demo_clinical()
    assert df.shape == (1097, 22) and df.attrs["delimiter"] == ","
    m = guess_mapping(df)
    assert (m.patient_id, m.time, m.event, m.time_unit) == ("bcr_patient_barcode", "OS.time",
                                                             "OS", "days")
    assert {"her2_status", "stage_group", "er_status"} <= set(m.groups)
    assert "vital_status" not in m.groups  # an outcome, not a grouping
    assert find_endpoints(df) == {"OS": ("OS.time", "OS"), "DSS": ("DSS.time", "DSS"),
                                  "PFI": ("PFI.time", "PFI"), "DFI": ("DFI.time", "DFI")}
    v = clinical.validate_survival(df, m, out_unit="months")
    # 5 redacted + 1 without OS.time, each listed with its reason
    assert v.n == 1091 and v.events == 151 - int(
        df.loc[df["Redaction"].notna(), "OS"].sum())
    assert sorted(v.dropped["reason"].value_counts().to_dict().items()) == [
        ("redacted (Redaction)", 5), ("time missing (OS.time)", 1)]
    assert "TCGA-OL-A66H" in set(v.dropped["patient_id"])
    row = v.table.set_index("patient_id").loc["TCGA-3C-AALI"]
    assert row["time"] == pytest.approx(4005 / (365.25 / 12))
    assert any("days to months" in p for p in v.problems)
    # DFI: NA events (not applicable) are left out and counted, never silently
    m_dfi = ColumnMapping("bcr_patient_barcode", "DFI.time", "DFI")
    v2 = clinical.validate_survival(df, m_dfi)
    assert v2.n + len(v2.dropped) == 1097
    assert any("no value in 'DFI'" in p for p in v2.problems)


def test_cp1252_semicolon_decimal_comma():
    text = ("Patient;Überleben_Monate;Status;Größe\n"
            "Müller-01;12,5;verstorben;2,1\n"
            "Schäfer-02;30;lebend;3\n"
            "Ørsted-03;7,25;1;1,5\n")
    df = clinical.read_clinical_table(text.encode("cp1252"), "kohorte.csv")
    assert df.attrs["encoding"] == "cp1252" and df.attrs["delimiter"] == ";"
    assert list(df.columns) == ["Patient", "Überleben_Monate", "Status", "Größe"]
    assert df["Patient"].tolist() == ["Müller-01", "Schäfer-02", "Ørsted-03"]
    assert df["Überleben_Monate"].tolist() == [12.5, 30.0, 7.25]
    # German event words are not in the rule: reported, not guessed
    v = clinical.validate_survival(df, ColumnMapping("Patient", "Überleben_Monate", "Status"), "months")
    assert v.n == 1 and set(v.dropped["reason"]) == {"event code not recognised (Status)"}
    assert any("'verstorben'" in p for p in v.problems)


def test_utf8_bom_tab_and_xlsx(tmp_path):
    text = "\ufeffid\ttime\tevent\n1\t10\tDead\n2\t20\tAlive\n"
    df = clinical.read_clinical_table(text.encode("utf-8"), "x.txt")
    assert list(df.columns) == ["id", "time", "event"] and df.attrs["delimiter"] == "\t"
    xl = tmp_path / "c.xlsx"
    pd.DataFrame({"id": ["007", "008"], "months": [1.5, 2], "vital": ["Dead", "Alive"]}
                 ).to_excel(xl, index=False)
    dx = clinical.read_clinical_table(xl)
    assert dx["months"].tolist() == [1.5, 2.0]
    assert dx["id"].tolist() == ["007", "008"]  # ids keep leading zeros
    m = guess_mapping(dx)
    assert (m.patient_id, m.time, m.event, m.time_unit) == ("id", "months", "vital", "months")


def test_event_coding_rule():
    s = pd.Series(["Dead", "alive", " YES ", "no", "True", "false", "1:DECEASED", "0:LIVING",
                   None, "maybe", 1, 0])
    ev, bad = coerce_events(s)
    assert ev.tolist()[:8] == [1, 0, 1, 0, 1, 0, 1, 0]
    assert np.isnan(ev[8]) and not bad[8]  # missing is missing, not unrecognised
    assert bad[9] and ev[10] == 1 and ev[11] == 0
    ev, bad = coerce_events(pd.Series([True, False]))
    assert ev.tolist() == [1.0, 0.0] and not bad.any()


def test_validation_problems_and_duplicates():
    df = pd.DataFrame({
        "pid": ["a", "b", "c", "d", "e", "e", "f", "f", None],
        "t": [10, -3, "ten", None, 5, 5, 7, 8, 4],
        "ev": [1, 0, 1, 1, "yes", "yes", 0, 1, 1],
    })
    df = clinical.read_clinical_table(clinical.safe_csv_bytes(df), "x.csv")  # round-trip through CSV
    v = clinical.validate_survival(df, ColumnMapping("pid", "t", "ev"), "days",
                          slide_patient_ids=["a", "zz"])
    reasons = dict(zip(v.dropped["row"], v.dropped["reason"]))
    assert reasons == {2: "negative time (t)", 3: "time is not a number (t)",
                       4: "time missing (t)", 6: "duplicate row (same survival data; first kept)",
                       7: "duplicate patient with conflicting survival data",
                       8: "duplicate patient with conflicting survival data",
                       9: "no patient id"}
    assert v.table["patient_id"].tolist() == ["a", "e"]
    assert v.table["event"].tolist() == [1, 1]
    text = " ".join(v.problems)
    assert "7 of 9 rows left out" in text and "negative" in text and "'ten'" in text
    assert "1 of 2 patients have no predicted slide" in text
    table, problems = v  # tuple-style unpacking
    assert table is v.table and problems is v.problems


@pytest.mark.parametrize("content,name,match", [
    (b"", "e.csv", "empty"),
    (b"id,time,event\n", "h.csv", "no data rows"),
    (b"id time event\n1 2 3\n", "s.csv", "only one column"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, "old.xls", "Excel 97"),
    (b"PK\x03\x04garbage", "bad.xlsx", "Excel workbook"),
    (b"a,a\n1,2\n", "d.csv", "used twice"),
])
def test_bad_files_have_clear_messages(content, name, match):
    with pytest.raises(ClinicalTableError, match=match):
        clinical.read_clinical_table(content, name)


def test_all_nonnumeric_times_and_bad_mapping():
    df = pd.DataFrame({"id": ["a", "b"], "t": ["long", "short"], "e": [1, 0]})
    with pytest.raises(ClinicalTableError, match="has no numbers"):
        clinical.validate_survival(df, ColumnMapping("id", "t", "e"))
    with pytest.raises(ClinicalTableError, match="not in the table"):
        clinical.validate_survival(df, ColumnMapping("id", "time", "e"))
    with pytest.raises(ClinicalTableError, match="Choose the column"):
        clinical.validate_survival(df, {"patient_id": "id", "time": "t", "event": None})
    with pytest.raises(ClinicalTableError, match="None of the 2 rows"):
        clinical.validate_survival(df.assign(t=[-1, -2]), ColumnMapping("id", "t", "e"))
    v = clinical.validate_survival(df.assign(t=[1, 2], e=[0, 0]), ColumnMapping("id", "t", "e"))
    assert any("Every usable patient is censored" in p for p in v.problems)


def test_safe_csv_and_pseudonyms():
    df = pd.DataFrame({"id": ["=HYPERLINK(\"x\")", "+1", "@SUM(A1)", "-2", "ok"],
                       "v": [-1.5, 2, 3, 4, 5]})
    out = pd.read_csv(io.BytesIO(clinical.safe_csv_bytes(df)))
    assert out["id"].tolist() == ["'=HYPERLINK(\"x\")", "'+1", "'@SUM(A1)", "'-2", "ok"]
    assert out["v"].tolist() == [-1.5, 2, 3, 4, 5]  # numbers stay numbers
    p1 = clinical.pseudonymise_ids(["TCGA-A", "TCGA-B"], salt="s1")
    p2 = clinical.pseudonymise_ids(["TCGA-A"], salt="s1")
    p3 = clinical.pseudonymise_ids(["TCGA-A"], salt="s2")
    assert p1[0] == p2[0] != p3[0] and p1[0] != p1[1]
    assert p1.str.fullmatch(r"P-[0-9a-f]{10}").all()
    with pytest.raises(ClinicalTableError):
        clinical.pseudonymise_ids(["a"], salt="")
