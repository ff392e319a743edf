"""Hypothesis fuzzing of every parser that sees user input.

Each parser must answer arbitrary input with a result that keeps its promises or with its
typed error; any other exception is a bug a user would see as a traceback.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ghist_core.analysis.clinical import (
    EVENT_FALSE,
    EVENT_TRUE,
    ColumnMapping,
    coerce_events,
    pseudonymise_ids,
    read_clinical_table,
    safe_csv_bytes,
    validate_survival,
)
from ghist_core.errors import ClinicalTableError, GhistError, InvalidFileNameError, InvalidMppError
from ghist_core.io.slide import check_mpp, open_slide
from ghist_core.project import sanitize_filename

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- file names
@FUZZ
@given(st.text(max_size=300))
def test_sanitize_filename_is_safe_or_refused(name: str) -> None:
    try:
        safe = sanitize_filename(name)
    except InvalidFileNameError:
        return
    assert re.fullmatch(r"[A-Za-z0-9._-]+", safe), safe
    assert ".." not in safe and not safe.startswith(".") and "/" not in safe and "\\" not in safe
    assert 1 <= len(safe) <= 120
    assert Path(safe).name == safe and not Path(safe).is_absolute()
    assert sanitize_filename(safe) == safe  # idempotent: a stored name stays as it is


@FUZZ
@given(st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "é", "\u2215", "\uff0f", "\u2024", "~", " ", "CON", ".svs"]),
                min_size=1, max_size=12))
def test_sanitize_filename_path_pieces(parts: list[str]) -> None:
    """Lookalike slashes and dots (fullwidth ／, division slash ∕, one-dot leader ․) never make a path."""
    try:
        safe = sanitize_filename("".join(parts))
    except InvalidFileNameError:
        return
    assert ".." not in safe and "/" not in safe and not safe.startswith(".")


# --------------------------------------------------------------------------- µm per pixel
@FUZZ
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=20),
                 st.none(), st.booleans(), st.decimals(allow_nan=True)))
def test_check_mpp(value: object) -> None:
    try:
        v = check_mpp(value)
    except InvalidMppError:
        return
    assert isinstance(v, float) and math.isfinite(v) and v > 0


# --------------------------------------------------------------------------- clinical tables
@FUZZ
@given(st.binary(max_size=3000), st.sampled_from(["t.csv", "t.tsv", "t.txt", "t.xlsx", "t.xls", "t"]))
def test_read_clinical_table_on_random_bytes(data: bytes, name: str) -> None:
    try:
        df = read_clinical_table(data, filename=name)
    except ClinicalTableError:
        return
    assert isinstance(df, pd.DataFrame) and df.shape[1] >= 2 and len(df) >= 1
    assert df.columns.is_unique


_CELL = st.one_of(st.text(max_size=12), st.sampled_from(["=cmd|' /C calc'!A0", "+1", "-1", "@SUM(A1)", "1,5", "", "NA",
                                                         "dead", "alive", "1e400", "-inf", '"', "\t=1"]))


@FUZZ
@given(st.lists(st.lists(_CELL, min_size=1, max_size=6), min_size=1, max_size=12),
       st.sampled_from([",", ";", "\t", "|"]), st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"]))
@example(rows=[['"'], ['"']], delim=",", encoding="utf-8")  # once raised pandas' EmptyDataError
def test_read_clinical_table_on_random_tables(rows: list[list[str]], delim: str, encoding: str) -> None:
    text = "\n".join(delim.join(r) for r in rows) + "\n"
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        assume(False)
        return
    try:
        df = read_clinical_table(data, filename="t.csv")
    except ClinicalTableError:
        return
    # whatever was read exports without a live formula
    out = safe_csv_bytes(df).decode("utf-8")
    import csv

    for row in csv.reader(io.StringIO(out)):
        for cell in row:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            if cell.startswith("-"):
                float(cell)  # only negative numbers may start with '-'


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["P1", "P2", "P3", "P4", "P5", "", " "]),
                          st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["x", "", "12"])),
                          st.sampled_from(sorted(EVENT_TRUE | EVENT_FALSE) + ["maybe", "", "2"])),
                min_size=1, max_size=25))
def test_validate_survival_keeps_promises(rows: list[tuple[str, object, str]]) -> None:
    df = pd.DataFrame(rows, columns=["pid", "t", "e"]).astype({"t": object})
    try:
        st_ = validate_survival(df, ColumnMapping(patient_id="pid", time="t", event="e"))
    except ClinicalTableError:
        return
    tab = st_.table
    assert len(tab) >= 1
    assert np.isfinite(tab["time"].to_numpy(float)).all() and (tab["time"] >= 0).all()
    assert set(tab["event"].unique()) <= {0, 1}
    assert tab["patient_id"].is_unique
    assert (tab["patient_id"].str.strip() != "").all()
    # nobody disappears silently: every input row is kept or listed with a reason
    assert len(tab) + len(st_.dropped) == len(df)
    assert (st_.dropped["reason"].str.len() > 0).all()


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=8), st.none(), st.integers(), st.floats()), max_size=30))
def test_coerce_events(values: list[object]) -> None:
    ev, bad = coerce_events(pd.Series(values, dtype=object))
    assert len(ev) == len(values)
    known = ev.dropna()
    assert set(known.unique()) <= {0.0, 1.0}
    assert not (bad & ev.notna()).any()


@FUZZ
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_pseudonyms_are_stable_and_hide_ids(ids: list[str], salt: str) -> None:
    a = pseudonymise_ids(ids, salt)
    b = pseudonymise_ids(list(ids), salt)
    assert a.tolist() == b.tolist()
    assert all(re.fullmatch(r"P-[0-9a-f]{10}", p) for p in a)
    for raw, p in zip(ids, a):
        assert raw not in p or raw in "P-0123456789abcdef"
    # distinct ids give distinct pseudonyms (10 hex digits: collisions are ~1e-12 here)
    assert len(set(a)) == len(set(ids))


# --------------------------------------------------------------------------- slides (mutated bytes)
def _small_tiff() -> bytes:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, photometric="rgb", tile=(32, 32), compression="zlib",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return buf.getvalue()


def _small_png() -> bytes:
    img = np.random.default_rng(1).integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


_TIFF = _small_tiff()
_PNG = _small_png()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut else b)


def _exercise(path: Path, mpp: float | None) -> None:
    try:
        with open_slide(path, mpp=mpp) as s:
            w, h = s.dimensions
            assert w > 0 and h > 0 and s.mpp > 0
            th = s.thumbnail(64)
            assert th.dtype == np.uint8 and th.ndim == 3 and th.shape[2] == 3
            r = s.read_region((0, 0), 0, (16, 16))
            assert r.shape == (16, 16, 3) and r.dtype == np.uint8
    except GhistError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(1, len(_TIFF))))
@example(edits=[(134, 0)], cut=None)  # ResolutionUnit became a tuple: once a TypeError from int()
def test_open_slide_on_mutated_tiff_headers(tmp_path: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    """Mutations in the first 400 bytes: the header and first IFD (sizes, offsets, tile sizes)."""
    p = tmp_path / "fuzz.tif"
    p.write_bytes(_mutate(_TIFF, edits, cut))
    _exercise(p, None)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=16))
def test_open_slide_on_mutated_tiff_anywhere(tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    p = tmp_path / "fuzz_any.svs"
    p.write_bytes(_mutate(_TIFF, edits, None))
    _exercise(p, None)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(1, len(_PNG))))
def test_open_slide_on_mutated_png(tmp_path: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    p = tmp_path / "fuzz.png"
    p.write_bytes(_mutate(_PNG, edits, cut))
    _exercise(p, 0.5)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
@example(width=1, height=517821, crc_salt=0)  # once tried to allocate 24 GiB (thumbnail margin)
def test_png_with_any_declared_size(tmp_path: Path, width: int, height: int, crc_salt: int) -> None:
    """IHDR may declare any size (0 to 4 G per side): refused or read, never a crash."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda k, b: struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b) & 0xFFFFFFFF)  # noqa: E731
    body = zlib.compress(b"\0" * 64)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    p = tmp_path / "declared.png"
    p.write_bytes(data)
    _exercise(p, 0.5)
