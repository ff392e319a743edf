"""A full disk during result writes (issue #20, point 5): a typed DiskFullError, never a
segfault, nothing half-written, no result file without its database row.

Real full disks are used where the test may mount a small tmpfs (root in a container);
otherwise those tests skip and the RLIMIT_FSIZE test (the kernel refuses writes past a
size: EFBIG, the same failure path) still runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from ghist_core.errors import DiskFullError, StoreError
from ghist_core.io.safe_h5 import check_free_space, estimate_h5ad_bytes, write_h5_isolated

REPO = Path(__file__).resolve().parents[2]

_WRITE_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np, anndata as ad
    from ghist_core.errors import DiskFullError
    from ghist_core.io.safe_h5 import write_h5_isolated
    target, fsize = sys.argv[1], int(sys.argv[2])
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    a = ad.AnnData(np.random.default_rng(0).random((20000, 300), dtype=np.float32))
    try:
        write_h5_isolated(target, lambda p: a.write_h5ad(p, compression="gzip"), estimated_bytes=0, margin_bytes=0)
        print("WRITTEN")
    except DiskFullError as e:
        print("DISKFULL", e)
""")


def _run_writer(target: Path, fsize: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _WRITE_SCRIPT, str(target), str(fsize)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(REPO))


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MB tmpfs, or skip where mounting is not allowed."""
    mnt = tmp_path / f"fs_{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root); the RLIMIT_FSIZE test covers the write path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))


def test_free_space_check_refuses_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskFullError, match="Not enough free disk space") as info:
        check_free_space(tmp_path / "not_yet" / "made", free + 1, margin_bytes=0)
    assert isinstance(info.value, StoreError)
    target = tmp_path / "out.h5"
    with pytest.raises(DiskFullError):
        write_h5_isolated(target, lambda p: p.write_bytes(b"x"), estimated_bytes=free + 1)
    assert list(tmp_path.iterdir()) == []  # nothing was written, not even the folder's temporary
    check_free_space(tmp_path, 1, margin_bytes=0)


def test_estimate_is_an_upper_bound_of_the_file(tmp_path):
    import anndata as ad
    import numpy as np

    a = ad.AnnData(np.random.default_rng(1).random((3000, 50), dtype=np.float32))
    a.obsm["spatial"] = np.zeros((3000, 2))
    out = write_h5_isolated(tmp_path / "a.h5ad", lambda p: a.write_h5ad(p, compression="gzip"),
                            estimated_bytes=estimate_h5ad_bytes(a))
    assert out.stat().st_size <= estimate_h5ad_bytes(a) and ad.read_h5ad(out).shape == (3000, 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad"]


def test_writer_error_is_a_store_error_and_nothing_is_left(tmp_path):
    def bad(p: Path) -> None:
        p.write_bytes(b"half")
        raise ValueError("boom")

    with pytest.raises(StoreError, match="ValueError: boom"):
        write_h5_isolated(tmp_path / "r.h5ad", bad, estimated_bytes=10)
    assert list(tmp_path.iterdir()) == []


def test_hdf5_hitting_the_file_size_limit_is_disk_full_not_a_crash(tmp_path):
    """EFBIG from RLIMIT_FSIZE: the same ENOSPC-like failure inside HDF5, without root."""
    res = _run_writer(tmp_path / "x.h5ad", fsize=2 * 2**20)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-1500:]}"
    assert "DISKFULL" in res.stdout, res.stdout + res.stderr[-1500:]
    assert list(tmp_path.iterdir()) == []


def test_hdf5_on_a_full_disk_is_disk_full_not_a_segfault(small_fs):
    """Unprotected, this write segfaults (exit 139) with 6-10 MB free: measured on this tmpfs."""
    _fill(small_fs, 6 * 2**20)
    res = _run_writer(small_fs / "x.h5ad")
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-1500:]}"
    assert "DISKFULL" in res.stdout and "filled up while writing" in res.stdout
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no half-written file


def _project(tmp_path_or_fs, small_slide_png):
    from ghist_core.project.store import Project

    project = Project.create(Path(tmp_path_or_fs) / "proj")
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=0.499)
    return project, record


def _result_rows(project) -> int:
    return project._conn().execute("SELECT COUNT(*) FROM result_files").fetchone()[0]


def test_failed_grid_write_leaves_no_orphan_h5ad(tmp_path, small_slide_png, tiny_ghist, monkeypatch):
    import ghist_core.pipeline.blocks as blocks

    project, record = _project(tmp_path, small_slide_png)

    def full(path, grids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blocks, "write_grid", full)
    with pytest.raises(DiskFullError, match="filled up while writing the grid summary"):
        blocks.predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                             device="cpu", config=blocks.PipelineConfig(block_um=256.0, grid_sizes_um=(100.0,)))
    run = project.latest_run(record.slide_id)
    assert run.status == "failed" and "filled up" in (run.error or "")
    out = blocks.results_dir(project, record.slide_id)
    assert not out.exists() or list(out.iterdir()) == []  # the published .h5ad went with the failure
    assert _result_rows(project) == 0


def test_prediction_on_a_full_disk_fails_typed_and_consistent(small_fs, small_slide_png, tiny_ghist):
    import ghist_core.pipeline.blocks as blocks

    project, record = _project(small_fs, small_slide_png)
    with pytest.raises(DiskFullError, match="Not enough free disk space"):
        blocks.predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                             device="cpu", config=blocks.PipelineConfig(block_um=256.0, grid_sizes_um=(100.0,)))
    assert project.latest_run(record.slide_id).status == "failed"
    assert _result_rows(project) == 0
    assert not list(project.folder.rglob("*.h5ad")) and not list(project.folder.rglob("*.part"))
    assert project._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    project.close()
