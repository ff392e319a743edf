"""Hostile and broken inputs end in a typed error or a correct result, within bounds.

The corpus (``hostile_corpus.py``, ≥ 50 cases) is written to ``tmp_path`` and run in a
child process with an address-space cap; a case that takes longer than its time bound is
a hang, anything but a ``GhistError`` escaping (or the process dying) is a crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile_corpus import Case, Result, build_corpus, expectation_met, run_corpus, summarise


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory, svs_path: Path) -> tuple[list[Case], list[Result]]:
    folder = tmp_path_factory.mktemp("hostile")
    cases = build_corpus(folder, svs_path)
    return cases, run_corpus(cases, folder)


def _table(pairs: list[tuple[Case, Result]]) -> str:
    return "\n".join(f"{c.name}: {r.outcome} {r.errors} {r.detail[:400]}" for c, r in pairs)


def test_corpus_is_large_and_varied(corpus_run: tuple[list[Case], list[Result]]) -> None:
    cases, _ = corpus_run
    assert len(cases) >= 50
    assert len({c.name for c in cases}) == len(cases)
    names = " ".join(c.name for c in cases)
    for kind in ("truncated", "flip", "zero_bytes", "huge_dims", "bomb", "tile", "mpp", "utf16", "cp1252",
                 "formula", "100k_columns", "named_"):
        assert kind in names, kind
    assert {c.kind for c in cases} == {"slide", "clinical"}


def test_no_crash_and_no_hang(corpus_run: tuple[list[Case], list[Result]]) -> None:
    cases, results = corpus_run
    bad = [(c, r) for c, r in zip(cases, results) if r.failed]
    assert not bad, "crashed, hung or gave a wrong result:\n" + _table(bad)


def test_each_case_ends_as_expected(corpus_run: tuple[list[Case], list[Result]]) -> None:
    """Broken files are refused with a typed error; good files under bad names are read correctly."""
    cases, results = corpus_run
    off = [(c, r) for c, r in zip(cases, results) if not expectation_met(c, r)]
    assert not off, "unexpected outcome:\n" + _table(off)


def test_typed_errors_name_the_problem(corpus_run: tuple[list[Case], list[Result]]) -> None:
    """Spot checks: the right subclass for the classic cases (a message the user can act on)."""
    cases, results = corpus_run
    by_name = {c.name: r for c, r in zip(cases, results)}
    assert "EmptyFileError" in by_name["zero_bytes_svs"].errors
    assert "ImageTooLargeError" in by_name["png_decompression_bomb_10gpx"].errors
    assert "ImageTooLargeError" in by_name["tiff_zlib_bomb_10gpx_no_pyramid"].errors
    assert "MissingMppError" in by_name["aperio_mpp_nan"].errors
    assert "InvalidMppError" in by_name["user_mpp_negative"].errors
    assert "UnsupportedSlideError" in by_name["text_named_svs"].errors
    assert "UnsupportedPixelFormatError" in by_name["tiff_float32"].errors
    assert "UnsupportedPixelFormatError" in by_name["tiff_cielab"].errors
    assert "ImageTooLargeError" in by_name["tiff_50000_pages"].errors
    assert "ImageTooLargeError" in by_name["tiff_zlib_single_strip_20k"].errors
    assert "MissingMppError" in by_name["tiff_mpp_40um_20k"].errors
    assert "InvalidMppError" in by_name["tiff_mpp_40um_20k_user_40"].errors
    assert "CorruptSlideError" in by_name["png_1x517821_declared"].errors
    for name in ("tiff_16bit", "tiff_cmyk", "tiff_palette", "tiff_miniswhite", "tiff_12bit_max_sample_value",
                 "png_12bit_in_16bit", "png_16bit_grey"):
        assert by_name[name].outcome == "ok", name  # read, and equal to the reference pixels
    assert "InvalidFileNameError" in by_name["name_refused_0"].errors
    assert "ClinicalTableError" in by_name["csv_100k_columns"].errors
    assert by_name["csv_formula_injection"].outcome == "ok"  # read, and exported with formulas defused


def test_summary_counts_add_up(corpus_run: tuple[list[Case], list[Result]]) -> None:
    _, results = corpus_run
    s = summarise(results)
    assert s["cases"] == s["typed_errors"] + s["correct_results"] + s["crashes"] + s["hangs"]
    assert s["crashes"] == 0 and s["hangs"] == 0
    assert s["correct_results"] >= 10 and s["typed_errors"] >= 40


def test_runner_reports_a_crash_and_a_hang(tmp_path: Path) -> None:
    """The harness itself can fail: a child killed by a signal is a crash, a silent one a hang."""
    from hostile_corpus import _Child

    child = _Child(tmp_path, 1024)
    try:
        child.proc.kill()  # the runner dies before answering
        child.proc.wait()
        res = child.ask(Case("dead", "slide", "x.svs", "error"), 5)
        assert res.outcome == "crash"
    finally:
        child.kill()
    child = _Child(tmp_path, 1024)
    try:
        child.proc.stdin.write("\n" * 3)  # blank lines: the child waits, never answers
        child.proc.stdin.flush()
        res = child._wait_for("quiet", 2.0)
        assert res.outcome == "hang"
    finally:
        child.kill()
