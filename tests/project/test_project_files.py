"""Safe on-disk names for uploaded files (the original name is kept for display)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ghist_core.errors import InvalidFileNameError, SlideError
from ghist_core.project import sanitize_filename
from ghist_core.project.files import copy_verified


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("CMU-1.svs", "CMU-1.svs"),
        ("Gewebe Müller (2).SVS", "Gewebe_Muller_2.svs"),
        ("日本語.ndpi", "file.ndpi"),
        ("ｓｌｉｄｅ１.tif", "slide1.tif"),  # fullwidth letters: NFKC
        ("..hidden.svs", "hidden.svs"),
        ("a....b.svs", "a.b.svs"),
        ("scan.ome.tiff", "scan.ome.tiff"),
        ("CON.svs", "_CON.svs"),
        ("x" * 300 + ".svs", "x" * 116 + ".svs"),
    ],
)
def test_sanitize_filename_accepts(name: str, safe: str) -> None:
    out = sanitize_filename(name)
    assert out == safe
    assert len(out) <= 120 and "/" not in out and ".." not in out and not out.startswith(".")


@pytest.mark.parametrize(
    "name",
    ["", "   ", "../../etc/passwd.svs", "/abs/slide.svs", "C:\\Users\\slide.svs", "..", "．．／evil.svs",
     "evil\u202egvs.svs", "nul\x00byte.svs", "tab\tname.svs"],
)
def test_sanitize_filename_refuses(name: str) -> None:
    with pytest.raises(InvalidFileNameError):
        sanitize_filename(name)


def test_copy_verified_copies_whole_files_and_refuses_changed_ones(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 9000)  # > 2 MiB: several chunks
    target = tmp_path / "project" / "slides" / "copy.bin"
    copy_verified(src, target, hashlib.sha256(src.read_bytes()).hexdigest(), "src.bin")
    assert target.read_bytes() == src.read_bytes()
    other = tmp_path / "project" / "slides" / "other.bin"
    with pytest.raises(SlideError, match="changed while it was being copied"):
        copy_verified(src, other, "0" * 64, "src.bin", changed_error=SlideError)
    assert sorted(p.name for p in other.parent.iterdir()) == ["copy.bin"]  # no target, no temporary
