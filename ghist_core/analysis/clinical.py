"""Clinical tables: import (CSV/TSV/XLSX), column mapping, validation, safe export.

Why: clinical spreadsheets arrive in every encoding, delimiter and coding of "dead". This
module turns one into a clean survival table (``patient_id``, ``time``, ``event`` + the
other columns) and says, in plain words, every row it could not use and why — it never
drops a patient silently. The original file is never modified (the store keeps it).

Event coding rule (case-insensitive, surrounding spaces ignored), used by
:func:`validate_survival` and stated in the UI:

* event = 1: ``1``, ``dead``, ``deceased``, ``died``, ``death``, ``yes``, ``y``, ``true``,
  ``event``, ``relapse``, ``recurred``, ``progressed``, and cBioPortal's ``1:DECEASED``;
* event = 0 (censored): ``0``, ``alive``, ``living``, ``censored``, ``no``, ``n``,
  ``false``, and ``0:LIVING``;
* anything else is a problem: the row is left out and listed.
"""

from __future__ import annotations

import csv
from collections import Counter
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ghist_core.errors import ClinicalTableError
from ghist_core.paths import DEMO_DIR

__all__ = [
    "DEMO_CLINICAL_CSV",
    "EVENT_TRUE",
    "EVENT_FALSE",
    "TIME_UNITS",
    "ColumnMapping",
    "SurvivalTable",
    "read_clinical_table",
    "guess_mapping",
    "find_endpoints",
    "validate_survival",
    "load_demo_clinical",
    "safe_csv_bytes",
    "pseudonymise_ids",
    "coerce_events",
]

DEMO_CLINICAL_CSV = DEMO_DIR / "tcga_brca_clinical.csv"

EVENT_TRUE = frozenset({"1", "1.0", "dead", "deceased", "died", "death", "yes", "y", "true",
                        "event", "relapse", "recurred", "progressed", "1:deceased",
                        "1:recurred/progressed", "1:recurred", "1:progression"})
EVENT_FALSE = frozenset({"0", "0.0", "alive", "living", "censored", "no", "n", "false",
                         "0:living", "0:diseasefree", "0:censored", "0:alive or dead tumor free"})

#: days per unit; conversion goes through days.
TIME_UNITS: dict[str, float] = {"days": 1.0, "weeks": 7.0, "months": 365.25 / 12, "years": 365.25}

_MAX_BYTES = 50 * 1024 * 1024
#: A one-row-per-patient table has tens to hundreds of columns; far more means it is
#: something else (e.g. an expression matrix), and parsing it would tie the app up.
_MAX_COLUMNS = 1000
_DELIMS = [",", ";", "\t", "|"]
#: The delimiter is guessed from at most this many characters and non-empty lines.
_SNIFF_BYTES = 64 * 1024
_SNIFF_LINES = 200
#: At most this many data rows (patients), in every format. XLSX limits, checked while streaming (the sheet's declared ``<dimension>`` is ignored:
#: it can claim A1:XFD1048576 in a 1.6 KB file). Values in sheet rows beyond :data:`_MAX_ROWS` + 1 or
#: values beyond column :data:`_MAX_COLUMNS` are refused; empty rows and cells there are
#: skipped; at most :data:`_MAX_CELLS` cells (rows × used columns) are kept. The workbook's
#: parts may unpack to at most :data:`_MAX_XLSX_UNPACKED` bytes (about 2 million cells of
#: XML, ~12 s to stream on one core).
_MAX_ROWS = 100_000
_MAX_CELLS = 2_000_000
_MAX_XLSX_UNPACKED = 96 * 1024 * 1024
_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


# --------------------------------------------------------------------------- import
def _decode(data: bytes) -> tuple[str, str]:
    """Decode bytes trying UTF-8 (with or without BOM), UTF-16 (BOM), cp1252, latin-1."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16"), "utf-16"
    for enc in _ENCODINGS:
        try:
            return data.decode(enc), ("utf-8" if enc == "utf-8-sig" else enc)
        except UnicodeDecodeError:
            continue
    raise ClinicalTableError("The file's text encoding could not be read.")  # latin-1 never fails


def _sniff_delimiter(text: str) -> str:
    """The delimiter that splits the start of the file into the same, largest number of fields.

    Linear in the sample and bounded: only the first :data:`_SNIFF_BYTES` characters and
    :data:`_SNIFF_LINES` non-empty lines are looked at (``csv.Sniffer``'s regular
    expressions are quadratic: 180 KB took minutes). Each candidate (``,`` ``;`` tab ``|``)
    splits the sample with the quote-aware ``csv`` reader; the winner is the one whose header
    has more than one field, that leaves no quote inside a field (it did not cut through a
    quoted value) and that most lines agree with (ties: more fields, then the order above);
    with none, ``,``.
    """
    sample = text[:_SNIFF_BYTES]
    if len(text) > _SNIFF_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # whole lines only
    lines = []
    for ln in sample.splitlines():
        if ln.strip():
            lines.append(ln)
            if len(lines) >= _SNIFF_LINES:
                break
    if not lines:
        raise ClinicalTableError("The file has no rows.")
    sample = "\n".join(lines)
    best, best_score = ",", (False, 0.0, 0.0, 0)
    for d in _DELIMS:
        try:
            records = [r for r in csv.reader(io.StringIO(sample), delimiter=d) if r]
        except csv.Error:  # e.g. a NUL byte; the parser says so later
            continue
        if not records:
            continue
        header = len(records[0])
        consistent = sum(len(r) == header for r in records) / len(records)
        # with the right delimiter, quotes open and close whole fields: a quote left inside a
        # field means this candidate cut through a quoted value
        clean = sum(not any('"' in f for f in r) for r in records) / len(records)
        score = (header > 1, clean, consistent, header)
        if score > best_score:
            best, best_score = d, score
    return best


def _tidy_types(df: pd.DataFrame) -> pd.DataFrame:
    """Columns read as text become numbers where every value is a number (ids with a
    leading zero stay text)."""
    out = df.copy()
    for c in out.columns:
        s = out[c]
        if s.dtype != object:
            continue
        st = s.dropna().astype(str).str.strip()
        if st.empty:
            continue
        if st.str.match(r"^0\d").any():
            continue
        num = pd.to_numeric(st, errors="coerce")
        if num.notna().all():
            out[c] = pd.to_numeric(s.astype(str).str.strip().replace({"": np.nan, "nan": np.nan}),
                                   errors="coerce")
    return out


def _column_letters(i: int) -> str:
    out = ""
    while i > 0:
        i, r = divmod(i - 1, 26)
        out = chr(65 + r) + out
    return out


def _read_xlsx(data: bytes, name: str) -> pd.DataFrame:
    """The first sheet of an XLSX workbook, streamed row by row within the stated limits.

    Memory is bounded by the kept cells (at most :data:`_MAX_CELLS` values) plus one row, never by the sheet's declared size: openpyxl's read-only mode is
    used with its declared dimension reset, so a single value at XFD1048576 is a typed error
    after a quick scan, not a 17-billion-cell grid.
    """
    import zipfile

    import openpyxl

    def unreadable(why: object) -> ClinicalTableError:
        return ClinicalTableError(
            f"{name!r} could not be read as an Excel workbook (.xlsx): {why}. Save it again "
            "from Excel as .xlsx or as CSV.")

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise unreadable(exc) from None
    if unpacked > _MAX_XLSX_UNPACKED:
        raise ClinicalTableError(
            f"{name!r} unpacks to {unpacked / 2**20:,.0f} MB, more than a clinical table needs "
            f"(limit {_MAX_XLSX_UNPACKED // 2**20} MB). Save the clinical sheet alone as CSV.")
    rows: list[tuple] = []
    width = 0
    wb = None
    try:
        wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        ws = wb.worksheets[0]
        ws.reset_dimensions()  # never trust <dimension ref="A1:XFD1048576">
        for n, row in enumerate(ws.iter_rows(values_only=True), start=1):
            filled = [j for j, v in enumerate(row) if v is not None and not (isinstance(v, str) and not v.strip())]
            if not filled:
                continue
            if filled[-1] >= _MAX_COLUMNS:
                raise ClinicalTableError(
                    f"{name!r} has a value in column {_column_letters(filled[-1] + 1)} (row {n}), beyond the "
                    f"{_MAX_COLUMNS:,}-column limit for a clinical table (one row per patient, one "
                    "column per variable). Delete the stray cells or upload the clinical sheet as CSV.")
            if n > _MAX_ROWS + 1 or len(rows) > _MAX_ROWS:  # header + _MAX_ROWS data rows
                raise ClinicalTableError(
                    f"{name!r} has a value in row {n:,}, beyond the {_MAX_ROWS:,}-patient limit for a "
                    "clinical table (one row per patient). Delete stray cells below the table.")
            width = max(width, filled[-1] + 1)
            if (len(rows) + 1) * width > _MAX_CELLS:
                raise ClinicalTableError(
                    f"{name!r} has more than {_MAX_CELLS:,} cells ({len(rows) + 1:,} rows × {width:,} columns "
                    "so far); a clinical table is far smaller. Upload the clinical sheet alone as CSV.")
            rows.append(tuple(row[:_MAX_COLUMNS]))
    except ClinicalTableError:
        raise
    except MemoryError:
        raise ClinicalTableError(f"{name!r} is too large to read as a clinical table.") from None
    except Exception as exc:  # openpyxl raises many kinds on a damaged workbook
        raise unreadable(exc) from None
    finally:
        if wb is not None:
            wb.close()
    if not rows:
        raise ClinicalTableError(f"{name!r} is empty.")
    header = [(f"Unnamed: {j}" if v is None else str(v)) for j, v in
              enumerate((tuple(rows[0]) + (None,) * width)[:width])]
    body = [(tuple(r) + (None,) * width)[:width] for r in rows[1:]]
    return pd.DataFrame(body, columns=header, dtype=object)


def read_clinical_table(path_or_bytes: str | os.PathLike | bytes, filename: str | None = None
                        ) -> pd.DataFrame:
    """Read a clinical table from a path or uploaded bytes.

    CSV/TSV/TXT: encoding detected (UTF-8 with/without BOM, UTF-16 with BOM, then cp1252,
    then latin-1) and delimiter sniffed (``,`` ``;`` tab ``|``); with ``;`` a decimal comma
    is accepted. XLSX: the first sheet, streamed. The result's ``attrs`` record ``encoding``,
    ``delimiter``, ``filename`` and ``sha256`` of the original bytes.

    Limits, checked before the table is built (each a :class:`ClinicalTableError`): 50 MB
    of file, 1,000 columns, 100,000 data rows; XLSX also 2 million cells and 96 MB unpacked
    (a value far outside the table, e.g. at XFD1048576, is refused, stray empty cells are
    ignored). The delimiter is guessed from the first 64 KB / 200 lines. Measured peak
    memory (``bench/robustness.py``): under 1.5 GB for the largest accepted CSV, about
    110 MB for a 1.6 KB workbook claiming A1:XFD1048576.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        name = filename or "uploaded.csv"
    else:
        p = Path(path_or_bytes)
        if not p.is_file():
            raise ClinicalTableError(f"The clinical table {str(p)!r} does not exist.")
        if p.stat().st_size > _MAX_BYTES:
            raise ClinicalTableError("The clinical table is larger than 50 MB; is it really a "
                                     "one-row-per-patient table?")
        data = p.read_bytes()
        name = filename or p.name
    if not data.strip():
        raise ClinicalTableError(f"{name!r} is empty.")
    if len(data) > _MAX_BYTES:
        raise ClinicalTableError("The clinical table is larger than 50 MB.")
    ext = Path(name).suffix.lower()
    attrs = {"filename": name, "sha256": hashlib.sha256(data).hexdigest()}
    if ext in (".xlsx", ".xlsm") or data[:4] == b"PK\x03\x04":
        df = _read_xlsx(data, name)
        df = df.map(lambda v: v.strip() if isinstance(v, str) else v)
        df = df.replace({"": np.nan})
        attrs.update(encoding="xlsx", delimiter=None)
    elif ext == ".xls" or data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        raise ClinicalTableError(
            f"{name!r} is an old Excel 97–2003 file (.xls). Open it in Excel or LibreOffice and "
            "save it as .xlsx or CSV.")
    else:
        if b"\x00" in data[:4096] and data[:2] not in (b"\xff\xfe", b"\xfe\xff"):
            raise ClinicalTableError(
                f"{name!r} does not look like a text table (it contains binary data). Upload a "
                "CSV, TSV or XLSX file.")
        text, enc = _decode(data)
        first = text.lstrip("\ufeff").split("\n", 1)[0]
        if max(first.count(d) for d in _DELIMS) >= _MAX_COLUMNS:
            raise ClinicalTableError(
                f"{name!r} has more than {_MAX_COLUMNS:,} columns in its header; a clinical table has one "
                "row per patient and one column per variable. Upload the clinical table itself.")
        if text.count("\n") > _MAX_ROWS + 1:  # refused before parsing (1e6 short rows fit in 50 MB)
            raise ClinicalTableError(
                f"{name!r} has more than {_MAX_ROWS:,} lines; a clinical table has one row per patient "
                f"(at most {_MAX_ROWS:,}). Upload the clinical table itself.")
        delim = "\t" if ext in (".tsv", ".tab") else _sniff_delimiter(text)
        try:
            df = pd.read_csv(io.StringIO(text), sep=delim, dtype=str, skipinitialspace=True,
                             keep_default_na=True, skip_blank_lines=True, engine="python")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
            raise ClinicalTableError(
                f"{name!r} could not be split into columns with delimiter {delim!r}: "
                f"{str(exc).splitlines()[0]}. Check that every row has the same number of "
                "fields (quotes around values that contain the delimiter).") from None
        header = next(csv.reader([text.lstrip("\ufeff").splitlines()[0]], delimiter=delim))
        header = [h.strip() for h in header]
        dup = sorted(h for h, k in Counter(header).items() if k > 1)
        if dup:
            raise ClinicalTableError(f"Column name(s) used twice: {', '.join(map(repr, dup))}. "
                                     "Rename them so each column has one name.")
        if delim == ";":  # European spreadsheets: 1,5 means 1.5
            for c in df.columns:
                s = df[c].dropna().str.strip()
                dec = s.str.fullmatch(r"-?\d+,\d+|-?\d+")
                if not s.empty and dec.mean() >= 0.8 and s.str.contains(",").any():
                    is_dec = df[c].str.strip().str.fullmatch(r"-?\d+,\d+").fillna(False)
                    df.loc[is_dec, c] = df.loc[is_dec, c].str.replace(",", ".", regex=False)
        attrs.update(encoding=enc, delimiter=delim)
    df.columns = [str(c).strip() for c in df.columns]
    if df.shape[1] < 2:
        raise ClinicalTableError(
            f"{name!r} has only one column ({df.columns[0]!r}). The delimiter was not "
            "recognised: use comma, semicolon, tab or | between columns.")
    dup = pd.Index(df.columns)[pd.Index(df.columns).duplicated()].unique().tolist()
    if dup:
        raise ClinicalTableError(f"Column name(s) used twice: {', '.join(map(repr, dup))}. "
                                 "Rename them so each column has one name.")
    df = df.dropna(how="all")
    if df.empty:
        raise ClinicalTableError(f"{name!r} has a header but no data rows.")
    df = _tidy_types(df).reset_index(drop=True)
    df.attrs.update(attrs)
    return df


# --------------------------------------------------------------------------- mapping
@dataclass
class ColumnMapping:
    """Which columns hold the patient id, survival time, event and grouping variables."""

    patient_id: str | None = None
    time: str | None = None
    event: str | None = None
    groups: list[str] = field(default_factory=list)
    time_unit: str = "days"

    def to_dict(self) -> dict:
        return {"patient_id": self.patient_id, "time": self.time, "event": self.event,
                "groups": list(self.groups), "time_unit": self.time_unit}


_ID_PAT = re.compile(r"(patient|subject|case|sample)?[ _.-]?(id|barcode|code|no)$|"
                     r"^bcr_patient_barcode$|^(patient|case|subject)$", re.I)
_TIME_PAT = re.compile(r"(^|[ _.])(time|days|months|years|survival|follow[ _-]?up|"
                       r"os|dss|pfs|pfi|dfi|dfs)[ _.]?(time|days|months|years)?$|\.time$|_time$|"
                       r"time_to", re.I)
_EVENT_PAT = re.compile(r"^(os|dss|pfi|dfi|pfs|dfs|rfs|efs)$|event|status|dead|death|censor|"
                        r"vital", re.I)


def find_endpoints(df: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Endpoint name → (time column, event column), from pairs like ``OS``/``OS.time``,
    ``PFS_STATUS``/``PFS_MONTHS``, ``dss_event``/``dss_time``."""
    cols = list(df.columns)
    low = {c.lower(): c for c in cols}
    out: dict[str, tuple[str, str]] = {}
    for ep in ("os", "dss", "pfi", "dfi", "pfs", "dfs", "rfs", "efs"):
        ev = next((low[k] for k in (ep, f"{ep}_event", f"{ep}.event", f"{ep}_status",
                                    f"{ep}.status") if k in low), None)
        tm = next((low[k] for k in (f"{ep}.time", f"{ep}_time", f"{ep}_days", f"{ep}_months",
                                    f"{ep}.months", f"{ep}_years") if k in low), None)
        if ev and tm:
            out[ep.upper()] = (tm, ev)
    return out


def _unit_from_name(col: str | None) -> str | None:
    if not col:
        return None
    c = col.lower()
    for u in ("days", "weeks", "months", "years"):
        if u in c or u[:-1] in c:
            return u
    return None


def guess_mapping(df: pd.DataFrame) -> ColumnMapping:
    """Best guesses for patient id, time, event and grouping columns (the user confirms).

    Time unit is guessed from the column name ("months", "days", ...), else days for
    columns ending in ``.time`` (TCGA-CDR convention), else days.
    """
    cols = list(df.columns)
    n = len(df)
    pid = next((c for c in cols if _ID_PAT.search(c) and df[c].nunique() >= 0.9 * n), None)
    if pid is None:  # first text column that is (nearly) unique
        pid = next((c for c in cols if df[c].dtype == object and df[c].nunique() >= 0.9 * n),
                   None)
    eps = find_endpoints(df)
    if eps:
        time, event = next(iter(eps.values()))
    else:
        time = next((c for c in cols if c != pid and _TIME_PAT.search(c)
                     and pd.api.types.is_numeric_dtype(df[c])), None)
        event = None
        codes = EVENT_TRUE | EVENT_FALSE
        for by_name in (True, False):  # a named event column first, then any 0/1-like one
            for c in cols:
                if event or c in (pid, time) or (by_name and not _EVENT_PAT.search(c)):
                    continue
                vals = set(df[c].dropna().astype(str).str.strip().str.lower())
                if vals and vals <= codes:
                    event = c
        if time is None:  # first mostly-numeric, non-negative column not the id or event
            for c in cols:
                num = pd.to_numeric(df[c], errors="coerce")
                if c not in (pid, event) and num.notna().mean() >= 0.8 \
                        and (num.dropna() >= 0).all() and num.nunique() > 2:
                    time = c
                    break
    used = {pid, time, event, *(v for p in eps.values() for v in p)}
    groups = []
    for c in cols:
        if c in used or re.search(r"vital|status_at|death|dead|redact", c, re.I):
            continue
        k = df[c].nunique(dropna=True)
        if 2 <= k <= 12 and not pd.api.types.is_float_dtype(df[c]):
            groups.append(c)
    return ColumnMapping(patient_id=pid, time=time, event=event, groups=groups,
                         time_unit=_unit_from_name(time) or "days")


# --------------------------------------------------------------------------- validation
def coerce_events(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Map event codes to 1/0 by the module's stated rule; returns (events, unrecognised mask).

    Missing values stay missing (not unrecognised)."""
    s = values
    if pd.api.types.is_bool_dtype(s):
        return s.astype(float), pd.Series(False, index=s.index)
    txt = s.astype(str).str.strip().str.lower()
    missing = s.isna() | txt.isin(["", "nan", "na", "n/a", "none", "[not available]"])
    ev = pd.Series(np.nan, index=s.index)
    ev[txt.isin(EVENT_TRUE)] = 1.0
    ev[txt.isin(EVENT_FALSE)] = 0.0
    bad = ev.isna() & ~missing
    return ev, bad


@dataclass
class SurvivalTable:
    """Clean survival table from :func:`validate_survival`.

    Attributes
    ----------
    table
        One row per usable patient: ``patient_id``, ``time`` (in ``time_unit``), ``event``
        (0/1), then every other column of the source unchanged.
    problems
        Human-readable list of everything found (shown on the page as it is).
    dropped
        Rows left out: ``row`` (1-based data row in the file), ``patient_id``, ``reason``.
    time_unit, source_unit
        Unit of ``time`` and the unit the file used.
    """

    table: pd.DataFrame
    problems: list[str]
    dropped: pd.DataFrame
    mapping: ColumnMapping
    time_unit: str
    source_unit: str
    n_input: int

    def __iter__(self):  # table, problems = validate_survival(...)
        return iter((self.table, self.problems))

    @property
    def n(self) -> int:
        return len(self.table)

    @property
    def events(self) -> int:
        return int(self.table["event"].sum())


def validate_survival(
    df: pd.DataFrame,
    mapping: ColumnMapping | dict,
    time_unit: str | None = None,
    *,
    out_unit: str | None = None,
    slide_patient_ids: Iterable[str] | None = None,
    exclude_redacted: bool = True,
) -> SurvivalTable:
    """Clean a clinical table for survival analysis and explain every change.

    ``time_unit`` is the unit in the file (default: ``mapping.time_unit``); times are
    converted to ``out_unit`` (default: the same). Rows are left out, and listed in
    ``.dropped`` with a reason, for: missing patient id, missing/non-numeric/negative time,
    missing or unrecognised event code, conflicting duplicate patients, and rows marked
    redacted in a ``Redaction`` column (TCGA-CDR asks to exclude them). Identical
    duplicate rows are merged into one (reported). Patients with no predicted slide are
    reported, not dropped (they still count for clinical groupings).

    Raises :class:`ClinicalTableError` when the mapping is unusable or no row survives.
    """
    m = mapping if isinstance(mapping, ColumnMapping) else ColumnMapping(**mapping)
    src_unit = time_unit or m.time_unit or "days"
    out_unit = out_unit or src_unit
    for u in (src_unit, out_unit):
        if u not in TIME_UNITS:
            raise ClinicalTableError(f"Unknown time unit {u!r}; use one of {', '.join(TIME_UNITS)}.")
    for role, col in (("patient id", m.patient_id), ("time", m.time), ("event", m.event)):
        if not col:
            raise ClinicalTableError(f"Choose the column that holds the {role}.")
        if col not in df.columns:
            raise ClinicalTableError(f"The {role} column {col!r} is not in the table.")
    if len({m.patient_id, m.time, m.event}) < 3:
        raise ClinicalTableError("Patient id, time and event must be three different columns.")
    n0 = len(df)
    problems: list[str] = []
    reasons = pd.Series("", index=df.index, dtype=object)

    def mark(mask: pd.Series, why: str) -> None:
        new = mask & (reasons == "")
        reasons[new] = why

    pid = df[m.patient_id].astype("string").str.strip()
    mark(pid.isna() | (pid == ""), "no patient id")

    raw_t = df[m.time]
    t = pd.to_numeric(raw_t, errors="coerce")
    nonnum = raw_t.notna() & t.isna() & (raw_t.astype(str).str.strip() != "")
    if nonnum.all() and len(df):
        ex = ", ".join(map(repr, raw_t.dropna().astype(str).unique()[:3]))
        raise ClinicalTableError(
            f"The time column {m.time!r} has no numbers (e.g. {ex}). Pick the column with the "
            "follow-up time in days, months or years.")
    if nonnum.any():
        ex = ", ".join(map(repr, raw_t[nonnum].astype(str).unique()[:3]))
        problems.append(f"{int(nonnum.sum())} time value(s) in {m.time!r} are not numbers "
                        f"(e.g. {ex}); those patients are left out.")
    mark(nonnum, f"time is not a number ({m.time})")
    mark(t.isna() & ~nonnum, f"time missing ({m.time})")
    if t.isna().sum() - nonnum.sum() > 0:
        problems.append(f"{int(t.isna().sum() - nonnum.sum())} patient(s) have no time in "
                        f"{m.time!r}; left out.")
    neg = t < 0
    if neg.any():
        problems.append(f"{int(neg.sum())} patient(s) have a negative time in {m.time!r}; "
                        "left out (check the date arithmetic in the source).")
    mark(neg, f"negative time ({m.time})")
    infinite = pd.Series(np.isinf(t.to_numpy(dtype=float)), index=t.index) & ~neg
    if infinite.any():
        problems.append(f"{int(infinite.sum())} patient(s) have an infinite time in {m.time!r}; left out.")
    mark(infinite, f"time is infinite ({m.time})")

    ev, bad_ev = coerce_events(df[m.event])
    if bad_ev.any():
        ex = ", ".join(map(repr, df.loc[bad_ev, m.event].astype(str).unique()[:4]))
        problems.append(
            f"{int(bad_ev.sum())} event value(s) in {m.event!r} are not recognised (e.g. {ex}). "
            "Recognised: 1/dead/deceased/yes/true = event, 0/alive/living/no/false = censored; "
            "those patients are left out.")
    mark(bad_ev, f"event code not recognised ({m.event})")
    mark(ev.isna() & ~bad_ev, f"event missing ({m.event})")
    if (ev.isna() & ~bad_ev).any():
        problems.append(f"{int((ev.isna() & ~bad_ev).sum())} patient(s) have no value in "
                        f"{m.event!r}; left out (e.g. endpoint not applicable).")
    if pd.api.types.is_numeric_dtype(df[m.event]) is False and not bad_ev.all():
        vals = sorted(set(df[m.event].dropna().astype(str).str.strip()))[:6]
        problems.append(f"Event column {m.event!r} coded as text ({', '.join(vals)}): mapped to "
                        "1 = event, 0 = censored by the stated rule.")

    red_col = next((c for c in df.columns if c.lower() == "redaction"), None)
    if exclude_redacted and red_col is not None:
        red = df[red_col].notna() & (df[red_col].astype(str).str.strip() != "")
        if red.any():
            problems.append(f"{int(red.sum())} patient(s) marked redacted in {red_col!r}; left "
                            "out as the data provider asks (TCGA-CDR).")
        mark(red, f"redacted ({red_col})")

    # duplicates among rows still usable
    ok = reasons == ""
    key_cols = [m.time, m.event]
    dup_any = pid.duplicated(keep=False) & ok & pid.notna()
    if dup_any.any():
        sub = pd.DataFrame({"pid": pid, "t": t, "e": ev})[dup_any]
        n_distinct = sub.groupby("pid")[["t", "e"]].nunique(dropna=False).max(axis=1)
        conflicting = set(n_distinct[n_distinct > 1].index)
        same = set(n_distinct[n_distinct == 1].index)
        if same:
            extra = dup_any & pid.isin(same) & pid.duplicated(keep="first")
            problems.append(f"{len(same)} patient(s) appear more than once with the same "
                            f"{' and '.join(key_cols)}; kept once.")
            mark(extra, "duplicate row (same survival data; first kept)")
        if conflicting:
            ex = ", ".join(sorted(conflicting)[:5])
            problems.append(f"{len(conflicting)} patient(s) appear more than once with different "
                            f"survival data (e.g. {ex}); all their rows are left out because the "
                            "right one cannot be known.")
            mark(dup_any & pid.isin(conflicting), "duplicate patient with conflicting survival data")

    keep = reasons == ""
    dropped = pd.DataFrame({"row": np.flatnonzero(~keep.to_numpy()) + 1,
                            "patient_id": pid[~keep].to_numpy(),
                            "reason": reasons[~keep].to_numpy()})
    if not keep.any():
        raise ClinicalTableError(
            f"None of the {n0} rows can be used: "
            + "; ".join(f"{k} ({v})" for k, v in dropped["reason"].value_counts().items()))
    factor = TIME_UNITS[src_unit] / TIME_UNITS[out_unit]
    rest = df.loc[keep, [c for c in df.columns if c not in (m.patient_id, m.time, m.event)]]
    rest = rest.drop(columns=[c for c in ("patient_id", "time", "event") if c in rest.columns])
    table = pd.concat([
        pd.DataFrame({"patient_id": pid[keep].astype(str).to_numpy(),
                      "time": (t[keep] * factor).to_numpy(dtype=float),
                      "event": ev[keep].astype(int).to_numpy()}),
        rest.reset_index(drop=True)], axis=1)
    if src_unit != out_unit:
        problems.append(f"Times converted from {src_unit} to {out_unit} "
                        f"(1 {src_unit[:-1]} = {factor:.6g} {out_unit}; 1 year = 365.25 days).")
    if int(table["event"].sum()) == 0:
        problems.append("Every usable patient is censored (no events): survival cannot be "
                        "compared on this endpoint.")
    if slide_patient_ids is not None:
        have = {str(s) for s in slide_patient_ids}
        no_slide = ~table["patient_id"].isin(have)
        if no_slide.any():
            problems.append(f"{int(no_slide.sum())} of {len(table)} patients have no predicted "
                            "slide; they are kept for clinical groupings but cannot enter "
                            "composition-based analyses.")
    if len(dropped):
        problems.insert(0, f"{len(dropped)} of {n0} rows left out; {int(keep.sum())} patients "
                           "usable (see the list of left-out rows).")
    table.attrs.update(time_unit=out_unit, source_unit=src_unit, mapping=m.to_dict())
    return SurvivalTable(table=table, problems=problems, dropped=dropped, mapping=m,
                         time_unit=out_unit, source_unit=src_unit, n_input=n0)


# --------------------------------------------------------------------------- demo + export
def load_demo_clinical() -> pd.DataFrame:
    """The bundled TCGA BRCA clinical table (TCGA-CDR + receptor status; no slides)."""
    return read_clinical_table(DEMO_CLINICAL_CSV)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _neutralise(v):
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def safe_csv_bytes(df: pd.DataFrame, *, index: bool = False) -> bytes:
    """CSV (UTF-8) where text cells that a spreadsheet would run as a formula (starting with
    = + - @ tab CR) get a leading apostrophe. Numbers are written as numbers."""
    out = df.copy()
    out.columns = [_neutralise(str(c)) for c in out.columns]
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(_neutralise)
    if index:
        out.index = out.index.map(lambda v: _neutralise(str(v)))
    return out.to_csv(index=index).encode("utf-8")


def pseudonymise_ids(ids: Sequence[str] | pd.Series, salt: str) -> pd.Series:
    """Stable pseudonyms ``P-<10 hex>`` from a keyed hash (HMAC-SHA256) of each id.

    The same id and salt give the same pseudonym; without the salt the ids cannot be
    recovered by hashing a list of known ids. Keep the salt private (the page makes one per
    session and never writes it out)."""
    import hmac

    if not salt:
        raise ClinicalTableError("A non-empty salt is needed to pseudonymise ids.")
    key = salt.encode("utf-8")
    vals = pd.Series(ids).astype(str)
    return vals.map(lambda s: "P-" + hmac.new(key, s.encode("utf-8"), hashlib.sha256).hexdigest()[:10])
