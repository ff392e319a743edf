"""End-to-end pipeline benchmark: seconds, cells/s, Mpx/s, peak RSS, split by stage.

Each scenario runs in a fresh subprocess (so peak RSS is its own). The baseline in
the same run is the pipeline with the classical (QuPath-style) segmenter; the
cohort scenario compares 1 and 2 Dask workers on 8 slides.

    python bench/pipeline.py [--device cpu|cuda] [--slide PATH] [--skip-cohort] [--gigapixel G]
    nice -n 10 python bench/pipeline.py --eta [--eta-segmenter learned] [--eta-block-um 128]

``--gigapixel G`` adds a G-gigapixel 40× (0.25 µm/px) pyramidal TIFF made from the demo's
tissue (mirrored tiles, zlib), the size the issue's H100 goal names (1 Gpx in < 3 min);
on the GPU machine see scripts/fetch_device_wheels.sh for the packages to carry.

``--eta`` runs one slide (the demo, cut into 128 µm blocks so there are ~60 of them) and records
the time left the run showed at 10 %, 25 % and 50 % of its actual duration against the actual
time left, for the estimator (``pipeline.eta``: measured seconds per tissue area, counted down
between blocks as the pages do) and the old elapsed × (1 − p) / p rule; it sets the "eta" key
of the results file and keeps everything else.

``--scaling [--scaling-sizes 0.02,0.1,1] [--scaling-segmenters classical,learned]`` builds (and caches
under tmp/scaling/, git-ignored) synthetic 40× slides of those sizes, checks each opens through
OpenSlide as a generic TIFF, and predicts each in a kept project in its own child process (seconds,
CPU seconds, s per tissue Mpx, cells/s, peak RSS, project disk); finished runs are cached and an
interrupted one resumes from its checkpoints, so ``nohup nice python bench/pipeline.py --scaling ...``
can be restarted; it sets the "scaling" key and keeps the rest.

Writes bench/results/pipeline.json (or pipeline_<device>.json for a GPU run); the default mode keeps
the file's "eta" and "scaling" blocks (and "cohort" with --skip-cohort). With the classical segmenter every mode runs the bundled
model's timing twin without cell inputs (the bundled model reads the learned segmenter's types).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _one_run(slide: str, device: str, segmenter: str | None, mpp: float | None) -> dict:
    """Child: one whole pipeline run in a temp project; prints a JSON line."""
    from ghist_core.pipeline.blocks import predict_slide
    from ghist_core.io.slide import open_slide
    from ghist_core.project.store import Project

    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "p")
        t = time.perf_counter()
        record = project.add_slide(slide, patient_id="BENCH", mpp=mpp)
        add_s = time.perf_counter() - t
        t = time.perf_counter()
        result = predict_slide(record.slide_id, project, device=device, segmenter_id=segmenter,
                               model_id=_model_for(segmenter))
        wall = time.perf_counter() - t
        with open_slide(project.slide_path(record.slide_id), mpp=record.mpp) as s:
            mpx = s.dimensions[0] * s.dimensions[1] / 1e6
        timings = result.timings
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "slide": Path(slide).name,
        "segmenter": segmenter or "learned (bundled)",
        "device": device,
        "megapixels": round(mpx, 3),
        "n_cells": result.n_cells,
        "seconds": round(wall, 2),
        "import_and_add_slide_s": round(add_s, 2),
        "cells_per_s": round(result.n_cells / wall, 1),
        "mpx_per_s": round(mpx / wall, 3),
        "peak_rss_mib": round(peak, 1),
        "stages_s": {k: round(float(v), 2) for k, v in timings.items()},
    }


def _eta_run(slide: str, device: str, segmenter: str | None, block_um: float) -> dict:
    """Child: one pipeline run recording every progress event's time left (seconds since the start)."""
    from ghist_core.pipeline.blocks import PipelineConfig, predict_slide
    from ghist_core.project.store import Project

    events: list[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "p")
        record = project.add_slide(slide, patient_id="BENCH")
        t0 = time.perf_counter()

        def progress(e) -> None:
            events.append([time.perf_counter() - t0, e.stage, e.overall, e.eta_low_s, e.eta_s, e.eta_high_s])

        result = predict_slide(record.slide_id, project, device=device, segmenter_id=segmenter,
                               model_id=_model_for(segmenter), config=PipelineConfig(block_um=block_um),
                               progress=progress)
        total = time.perf_counter() - t0
    return {"total_s": total, "events": events, "n_cells": result.n_cells,
            "blocks": sum(1 for e in events if e[1] == "segment+predict") - 1}


def _eta_at(events: list[list], total: float, share: float) -> dict:
    """What the run showed at ``share`` of its duration vs the actual time left then."""
    t = share * total
    actual = total - t
    shown = [e for e in events if e[0] <= t]
    last = shown[-1] if shown else None
    out: dict = {"at_s": round(t, 2), "actual_left_s": round(actual, 2)}
    if last is not None and last[4] is not None:
        gone = t - last[0]  # the pages count the last record down (never below 0 for the running block)
        low, mid, high = (max(0.0, v - gone) for v in (last[3], last[4], last[5]))
        out.update(predicted_left_s=round(mid, 2), range_s=[round(low, 2), round(high, 2)],
                   error=round((mid - actual) / actual, 3), actual_in_range=bool(low <= actual <= high))
    else:
        out.update(predicted_left_s=None, error=None)
    if last is not None and last[2] > 0.05:  # the old rule, as it read at that moment
        old = t * (1 - last[2]) / last[2]
        out.update(old_rule_left_s=round(old, 2), old_rule_error=round((old - actual) / actual, 3))
    return out


def _eta_bench(slide: str, device: str, segmenter: str, block_um: float) -> dict:
    seg = "-" if segmenter == "learned" else segmenter  # the bundled model reads the learned segmenter's types
    cmd = [sys.executable, __file__, "--eta-child", slide, device, seg, str(block_um)]
    load = [round(v, 2) for v in os.getloadavg()]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    points = {f"{int(p * 100)}%": _eta_at(r["events"], r["total_s"], p) for p in (0.10, 0.25, 0.50)}
    errs = [abs(v["error"]) for k, v in points.items() if k != "10%" and v.get("error") is not None]
    return {
        "slide": Path(slide).name, "segmenter": segmenter, "device": device, "block_um": block_um,
        "blocks": r["blocks"], "n_cells": r["n_cells"], "total_s": round(r["total_s"], 2),
        "points": points,
        "goal": "predicted time left within ±25 % of the actual from 25 % done on",
        "goal_met": bool(errs) and max(errs) <= 0.25,
        "machine_load_before": load, "cpus": os.cpu_count(),
        "note": "'error' = (predicted − actual) / actual; load average (1, 5, 15 min) before the run in machine_load_before",
    }


#: The synthetic slides' layout: square tissue islands of 2 x 2 pipeline blocks (512 um each at 0.25 um/px),
#: inset by 32 um, with one block of glass between islands: 4/9 of the slide area in the islands' blocks,
#: the rest glass (a real section's tissue share is about 20-60 %). Blocks are either tissue or glass,
#: so every size has the same tissue per block and the tissue mask cannot split the tissue itself.
ISLAND_PERIOD_PX = 6144
ISLAND_PX = 4096
ISLAND_INSET_PX = 128
GLASS_RGB = (236, 234, 240)


def make_gigapixel_tiff(out: Path, gigapixels: float, *, mpp: float = 0.25, tile: int = 1024) -> Path:
    """A pyramidal tiled TIFF of about ``gigapixels`` x 1e9 px at ``mpp``: demo tissue islands on glass.

    A dense 240 um patch of the demo (0.499 um/px, resampled to ``mpp``) is mirror-tiled inside each
    island, so every tissue tile holds real nuclei at the right size; glass lies between islands as on
    a real slide (see ``ISLAND_*``). Each level is cut from one period of the layout resampled to that
    level (memory: one period per level, whatever the slide's size).
    """
    import tifffile
    from PIL import Image

    from ghist_core.io.slide import open_slide

    # a whole number of 512 um pipeline blocks (2048 px at 0.25 um/px), the requested area or a little more: no
    # half blocks at the edges (the learned segmenter pads an edge block to a square, so a half block costs a whole one)
    block_px = 2048
    side = block_px * max(1, int(np.ceil(np.sqrt(gigapixels * 1e9) / block_px - 0.25)))
    patch_px = 960  # at ``mpp``: 240 um
    with open_slide(REPO / "demo" / "CMU-1-Small-Region.svs") as s:
        src_px = int(round(patch_px * mpp / s.mpp))
        # a dense stretch of the demo's epidermis and dermis (checked by eye on its thumbnail)
        src = Image.fromarray(s.read_region((860, 1700), 0, (src_px, src_px)))
    n_levels = max(1, int(np.log2(side / 1024)) + 1)

    def period(level: int) -> np.ndarray:
        f = 2 ** level
        n, p = ISLAND_PERIOD_PX // f, patch_px // f
        patch = np.asarray(src.resize((p, p), Image.Resampling.LANCZOS))
        idx = np.arange(n) % (2 * p)
        idx = np.where(idx < p, idx, 2 * p - 1 - idx)  # mirror: seamless
        img = np.empty((n, n, 3), np.uint8)
        img[:] = GLASS_RGB
        a, b = ISLAND_INSET_PX // f, (ISLAND_PX - ISLAND_INSET_PX) // f
        img[a:b, a:b] = patch[idx[a:b]][:, idx[a:b]]
        return img

    def tiles(level: int):
        img = period(level)
        n, per = side // 2 ** level, img.shape[0]
        ramp = np.arange(tile)
        for y0 in range(0, n, tile):
            rows = (y0 + ramp) % per
            for x0 in range(0, n, tile):
                yield np.ascontiguousarray(img[rows][:, (x0 + ramp) % per])

    out.parent.mkdir(parents=True, exist_ok=True)
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        # reduced levels as top-level IFDs (subfiletype 1), not SubIFDs: OpenSlide's generic-TIFF driver only
        # sees the pyramid that way (with SubIFDs it opened these files as one 1 Gpx level; tifffile reads both)
        tw.write(tiles(0), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                 photometric="rgb", resolution=res, resolutionunit="CENTIMETER", maxworkers=2)
        for lv in range(1, n_levels):
            n = side // 2 ** lv
            tw.write(tiles(lv), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="rgb", subfiletype=1, resolution=(res[0] / 2 ** lv, res[1] / 2 ** lv),
                     resolutionunit="CENTIMETER", maxworkers=2)
    return out


# --- scaling series (issue #18.2): synthetic 40× slides of growing size, both segmenters -------------

SCALING_WORK = REPO / "tmp" / "scaling"  # git-ignored: cached slides, kept projects, per-run results


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _nocell_ghist(folder: Path) -> Path:
    """The bundled GHIST architecture without per-cell inputs, for the classical segmenter (timing only).

    The bundled model reads the learned segmenter's type probabilities, so ``predict_slide`` refuses
    it with the classical segmenter; this twin has the same encoder, heads and genes (weights copied
    where the shapes match, the rest random), so its cost per cell is the bundled model's.
    """
    if (folder / "ghist-her2st.json").is_file():
        return folder
    import torch

    from ghist_core.model import GhistConfig, GhistNet, load_ghist
    from ghist_core.model.predict import save_ghist

    bundled = json.loads((REPO / "weights" / "ghist-her2st.json").read_text())
    cfg = GhistConfig.from_dict({**bundled["config"], "cell_inputs": []})
    torch.manual_seed(0)
    net = GhistNet(cfg)
    src = load_ghist(device="cpu")
    src_state = getattr(src, "net", src).state_dict()
    own = net.state_dict()
    net.load_state_dict({k: (src_state[k] if k in src_state and src_state[k].shape == v.shape else v)
                         for k, v in own.items()})
    save_ghist(net, folder, {"training": {"data": "timing twin of ghist-her2st without cell inputs (bench only)"}})
    return folder


def _model_for(segmenter: str | None) -> str | None:
    """The model a run with ``segmenter`` uses here: the bundled one, or with the classical segmenter
    its timing twin without cell inputs (the bundled model refuses the classical segmenter)."""
    if segmenter != "classical":
        return None
    sha = json.loads((REPO / "weights" / "ghist-her2st.json").read_text())["sha256"][:12]
    return str(_nocell_ghist(SCALING_WORK / f"ghist_nocell_{sha}"))


def _output_digest(h5ad: Path) -> dict:
    """sha256 of a result's numbers (X, cell ids and positions, every obsm matrix): equal digests = same output."""
    import hashlib

    import anndata as ad

    a = ad.read_h5ad(h5ad)
    parts = {"X": np.ascontiguousarray(np.asarray(a.X, dtype=np.float32)).tobytes(),
             "obs_names": "\n".join(map(str, a.obs_names)).encode(),
             "xy": np.ascontiguousarray(a.obsm["spatial"], dtype=np.float64).tobytes()}
    for k in sorted(a.obsm):
        parts[f"obsm:{k}"] = np.ascontiguousarray(np.asarray(a.obsm[k], dtype=np.float64)).tobytes()
    return {"n_cells": int(a.n_obs), "n_genes": int(a.n_vars),
            "sha256": hashlib.sha256(b"".join(hashlib.sha256(v).digest() for v in parts.values())).hexdigest(),
            "parts": sorted(parts)}


def _scaling_slide(gpx: float) -> tuple[Path, dict]:
    """The cached synthetic slide of ``gpx`` gigapixels and how it opens (OpenSlide generic TIFF)."""
    import os

    path = SCALING_WORK / "slides" / f"synthetic_{gpx:g}gpx.tif"
    info_path = path.with_suffix(".json")
    if info_path.is_file() and path.is_file():
        return path, json.loads(info_path.read_text())
    t = time.perf_counter()
    tmp = path.with_suffix(".part.tif")
    make_gigapixel_tiff(tmp, gpx)
    os.replace(tmp, path)
    info: dict = {"build_s": round(time.perf_counter() - t, 1), "file_bytes": path.stat().st_size,
                  "levels_as": "top-level IFDs (subfiletype 1)",
                  "loadavg_build": [round(v, 2) for v in os.getloadavg()]}
    import openslide

    from ghist_core.io.slide import open_slide

    with openslide.OpenSlide(str(path)) as o:  # the real-format check: OpenSlide's generic-TIFF driver
        info["openslide"] = {
            "vendor": o.properties.get("openslide.vendor"),
            "detect_format": openslide.OpenSlide.detect_format(str(path)),
            "dimensions": list(o.dimensions), "level_count": o.level_count,
            "level_downsamples": [round(d, 3) for d in o.level_downsamples],
            "mpp_x": o.properties.get("openslide.mpp-x"),
            "read_region_ok": o.read_region((o.dimensions[0] // 2, o.dimensions[1] // 2), 0, (512, 512)).size == (512, 512),
            "library_version": openslide.__library_version__,
        }
    with open_slide(path) as s:
        info["ghist_open_slide"] = {"format": s.format, "vendor": s.vendor, "mpp": round(float(s.mpp), 4),
                                    "dimensions": list(s.dimensions), "level_count": s.level_count}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info


def _scaling_run(slide: str, segmenter: str, key: str) -> dict:
    """Child: predict one synthetic slide in a kept project (resumes its unfinished run); prints a JSON line."""
    import os

    from ghist_core.io.slide import open_slide
    from ghist_core.pipeline.blocks import PipelineConfig, plan_blocks, predict_slide
    from ghist_core.project.store import Project

    load0 = os.getloadavg()
    folder = SCALING_WORK / "projects" / key
    project = Project.open_or_create(folder, name=key)
    slides = project.list_slides()
    record = (project.get_slide(int(slides["slide_id"].iloc[0])) if len(slides)
              else project.add_slide(slide, patient_id="SCALING", mpp=0.25))
    project.mark_interrupted_runs(stale_after_s=0)  # a killed earlier child of this key: resume it (nohup-safe)
    last = project.latest_run(record.slide_id)
    resume = last.run_id if last is not None and last.status.is_resumable else None
    model_id = _model_for(None if segmenter == "learned" else segmenter)
    with open_slide(project.slide_path(record.slide_id), mpp=record.mpp) as s:
        blocks = plan_blocks(s, PipelineConfig())
        tissue_mpx = sum(b.tissue_um2 for b in blocks) / s.mpp ** 2 / 1e6
        total_mpx = s.dimensions[0] * s.dimensions[1] / 1e6
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t = time.perf_counter()
    result = predict_slide(record.slide_id, project, device="cpu", model_id=model_id,
                           segmenter_id="classical" if segmenter == "classical" else None, run_id=resume)
    wall = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_SELF)
    ruc = resource.getrusage(resource.RUSAGE_CHILDREN)  # the forked HDF5 writers
    peak = ru.ru_maxrss / 1024
    peak_writer = ruc.ru_maxrss / 1024
    cpu = ru.ru_utime + ru.ru_stime - cpu0  # all threads of this process: less sensitive to a busy machine than wall time
    cpu += ruc.ru_utime + ruc.ru_stime
    slide_bytes = project.slide_path(record.slide_id).stat().st_size
    total_bytes = _du(folder)
    run_dir = project.run_dir(result.run_id)
    blocks_bytes = _du(run_dir / "blocks") if (run_dir / "blocks").is_dir() else 0
    gpx = total_mpx / 1e3
    return {
        "segmenter": segmenter, "gigapixels": round(gpx, 4), "tissue_mpx": round(tissue_mpx, 1),
        "blocks": len(blocks), "n_cells": result.n_cells, "seconds": round(wall, 1),
        "s_per_tissue_mpx": round(wall / tissue_mpx, 3), "cells_per_s": round(result.n_cells / wall, 1),
        "cpu_s": round(cpu, 1), "cpu_s_per_tissue_mpx": round(cpu / tissue_mpx, 3),
        "torch_threads": __import__("torch").get_num_threads(),
        "stages_s": {k: round(float(v), 2) for k, v in result.timings.items()},
        "peak_rss_mib": round(max(peak, peak_writer), 1), "peak_rss_main_mib": round(peak, 1),
        "peak_rss_writer_mib": round(peak_writer, 1),
        "project_bytes": total_bytes, "slide_copy_bytes": slide_bytes,
        "results_bytes": total_bytes - slide_bytes, "block_checkpoint_bytes": blocks_bytes,
        "results_bytes_per_gpx": int((total_bytes - slide_bytes) / gpx),
        "project_bytes_per_gpx": int(total_bytes / gpx),
        "resumed_run": resume is not None,
        "output_digest": _output_digest(result.h5ad_path),
        "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }


def _scaling(sizes: list[float], segmenters: list[str], budget_s: float | None) -> dict:
    """Runs each (segmenter, size) not yet in SCALING_WORK/results (each in a fresh child), then summarises."""
    import shutil

    res_dir = SCALING_WORK / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    for seg in segmenters:
        for gpx in sizes:
            key = f"{seg}_{gpx:g}gpx"
            done = res_dir / f"{key}.json"
            if done.is_file():
                continue
            prior = _scaling_rate(res_dir, seg)
            if budget_s is not None and prior is not None:
                fracs = [r["tissue_mpx"] / (r["gigapixels"] * 1e3) for r in map(json.loads, map(Path.read_text, res_dir.glob("*gpx.json")))]
                guess = prior * gpx * 1e3 * max(fracs, default=1.0)  # the tissue share the synthetic slides have shown
                if guess > budget_s:
                    print(f"skip {key}: about {guess:.0f} s at {prior:.3f} s per tissue Mpx > budget {budget_s:.0f} s")
                    continue
            slide, info = _scaling_slide(gpx)
            print(f"{key}: slide ready ({info['openslide']['vendor']}, {info['file_bytes'] / 1e6:.0f} MB); running")
            cmd = [sys.executable, __file__, "--scaling-child", str(slide), seg, key]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                raise RuntimeError(f"scaling child failed: {out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["slide"] = {"path_name": slide.name, **info}
            done.write_text(json.dumps(r, indent=2) + "\n")
            print(f"{key}: {r['seconds']} s, {r['s_per_tissue_mpx']} s/tissue Mpx, {r['n_cells']} cells, "
                  f"peak {r['peak_rss_mib']} MiB, results {r['results_bytes'] / 1e6:.0f} MB, load {r['loadavg_end']}")
            shutil.rmtree(SCALING_WORK / "projects" / key, ignore_errors=True)  # finished: free the disk
    return _scaling_summary(res_dir)


def _scaling_kill_resume(gpx: float, seg: str, kill_at: float = 0.5) -> dict:
    """SIGKILL a fresh run of the ``gpx`` slide once ``kill_at`` of its blocks are checkpointed, run it again
    (the child resumes the interrupted run), and compare the output with the uninterrupted run's digest.
    Resumable itself: a kill already done (``<key>.kill.json``) is not repeated."""
    import os
    import signal
    import shutil

    res_dir = SCALING_WORK / "results"
    ref = json.loads((res_dir / f"{seg}_{gpx:g}gpx.json").read_text())  # the uninterrupted run comes first
    key = f"{seg}_{gpx:g}gpx_killed"
    done, kill_path = res_dir / f"{key}.json", res_dir / f"{key}.kill.json"
    if done.is_file():
        return json.loads(done.read_text())
    slide, _info = _scaling_slide(gpx)
    folder = SCALING_WORK / "projects" / key
    cmd = [sys.executable, __file__, "--scaling-child", str(slide), seg, key]
    if not kill_path.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = int(np.ceil(kill_at * ref["blocks"]))
        n_done = 0
        while child.poll() is None:
            n_done = len(list(folder.glob("runs/*/blocks/block_*.h5ad")))
            if n_done >= target:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(1.0)
        if child.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run to kill ended by itself (exit {child.returncode}) before {target} blocks")
        kill_path.write_text(json.dumps({"killed_after_s": round(time.perf_counter() - t, 1), "blocks_done_at_kill": n_done,
                                         "blocks": ref["blocks"], "signal": "SIGKILL (whole process group)"}) + "\n")
    kill = json.loads(kill_path.read_text())
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"resumed child failed: {out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rec = {"segmenter": seg, "gigapixels": r["gigapixels"], **kill, "resumed_run": r["resumed_run"],
           "resume_seconds": r["seconds"], "uninterrupted_seconds": ref["seconds"],
           "killed_plus_resumed_seconds": round(kill["killed_after_s"] + r["seconds"], 1),
           "output_digest": r["output_digest"], "uninterrupted_digest": ref["output_digest"],
           "identical_output": bool(r["resumed_run"]) and r["output_digest"]["sha256"] == ref["output_digest"]["sha256"],
           "loadavg_end": r["loadavg_end"]}
    done.write_text(json.dumps(rec, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return rec


def _scaling_rate(res_dir: Path, seg: str) -> float | None:
    """s per tissue Mpx of the largest finished run of ``seg`` (its extrapolation basis)."""
    runs = [json.loads(p.read_text()) for p in res_dir.glob(f"{seg}_*gpx.json")]
    runs = [r for r in runs if r["gigapixels"] >= 0.05] or runs
    return max(runs, key=lambda r: r["gigapixels"])["s_per_tissue_mpx"] if runs else None


def _scaling_summary(res_dir: Path) -> dict:
    import os

    runs = sorted((json.loads(p.read_text()) for p in res_dir.glob("*gpx.json")),
                  key=lambda r: (r["segmenter"], r["gigapixels"]))
    out: dict = {
        "what": "synthetic 40x (0.25 um/px) pyramidal tiled TIFFs (bench/pipeline.py make_gigapixel_tiff: islands of "
                "demo tissue, 2 x 2 blocks each, with a block of glass between them; zlib, 1024 px tiles), also opened "
                "through OpenSlide's generic-TIFF driver; predicted in a fresh project per run (one child process per "
                "run: peak RSS = ru_maxrss of that process); CPU only",
        "classical_model": "classical segmenter + the bundled GHIST architecture without cell inputs (the bundled "
                           "model refuses the classical segmenter; timing twin, weights copied where shapes match)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (see loadavg per run)",
        "runs": runs,
        "goal": "s per tissue Mpx and peak RSS flat within ±15 % from 0.1 to 1 Gpx",
        "note": "wall seconds on this 2-core machine (load per run recorded; other work ran beside some runs): "
                "cpu_s (user+system of the run's process, all threads) per tissue Mpx is the steadier rate. tissue "
                "Mpx = level-0 pixels of the blocks' tissue from the pipeline's own tissue mask; the islands fill 88 % "
                "of each tissue block, so every size has the same tissue per block. An earlier series on edge-to-edge "
                "tissue (no glass) is not comparable: its tissue mask split the tissue itself (kept 46 % -> 3 %)",
    }
    by_seg: dict = {}
    for r in runs:
        by_seg.setdefault(r["segmenter"], []).append(r)
    summary: dict = {}
    for seg, rs in by_seg.items():
        rs.sort(key=lambda r: r["gigapixels"])
        rate = _scaling_rate(res_dir, seg)
        s: dict = {"sizes_gpx": [r["gigapixels"] for r in rs],
                   "s_per_tissue_mpx": [r["s_per_tissue_mpx"] for r in rs],
                   "peak_rss_mib": [r["peak_rss_mib"] for r in rs],
                   "cells_per_s": [r["cells_per_s"] for r in rs],
                   "cpu_s_per_tissue_mpx": [r.get("cpu_s_per_tissue_mpx") for r in rs],
                   "tissue_share": [round(r["tissue_mpx"] / (r["gigapixels"] * 1e3), 3) for r in rs],
                   "cells_per_tissue_mpx": [round(r["n_cells"] / r["tissue_mpx"], 1) for r in rs],
                   "cpu_ms_per_cell": [round(1e3 * r["cpu_s"] / r["n_cells"], 2) if r.get("cpu_s") else None for r in rs],
                   "results_bytes_per_cell": [int(r["results_bytes"] / r["n_cells"]) for r in rs],
                   "n_cells": [r["n_cells"] for r in rs],
                   "loadavg_1min_during": [r["loadavg_end"][0] for r in rs],
                   "results_bytes_per_gpx": [r["results_bytes_per_gpx"] for r in rs],
                   "wall_hours_per_tissue_gpx": round(rate * 1e3 / 3600, 3),
                   "extrapolated_2gpx_all_tissue_wall_h": round(rate * 2e3 / 3600, 3),
                   "extrapolated_2gpx_40pct_tissue_wall_h": round(rate * 0.8e3 / 3600, 3),
                   "wall_s_per_slide_gpx_at_this_layout": round(rs[-1]["seconds"] / rs[-1]["gigapixels"], 1)}
        big = max(rs, key=lambda r: r["gigapixels"])
        if big.get("cpu_s_per_tissue_mpx"):
            c = big["cpu_s_per_tissue_mpx"]
            s["cpu_hours_per_tissue_gpx"] = round(c * 1e3 / 3600, 2)
            # both cores busy for the whole run (torch and the segmenters use 2 threads): the quiet-machine wall time
            s["extrapolated_2gpx_all_tissue_h_quiet_2_cores"] = round(c * 2e3 / 2 / 3600, 2)
        if len(rs) > 1:
            s["flatness_s_per_mpx_largest_vs_smallest"] = round(rs[-1]["s_per_tissue_mpx"] / rs[0]["s_per_tissue_mpx"], 3)
            if rs[0].get("cpu_s") and rs[-1].get("cpu_s"):
                s["flatness_cpu_ms_per_cell_largest_vs_smallest"] = round(
                    (rs[-1]["cpu_s"] / rs[-1]["n_cells"]) / (rs[0]["cpu_s"] / rs[0]["n_cells"]), 3)
            ref = [r for r in rs if 0.05 <= r["gigapixels"] <= 0.2]  # the range: 0.1 -> 1 Gpx
            if ref and rs[-1]["gigapixels"] > 0.5 and ref[0].get("cpu_s") and rs[-1].get("cpu_s"):
                a, b = ref[0], rs[-1]
                s["from_0.1_to_1_gpx"] = {
                    "cpu_s_per_tissue_mpx_ratio": round(b["cpu_s_per_tissue_mpx"] / a["cpu_s_per_tissue_mpx"], 3),
                    "cpu_ms_per_cell_ratio": round((b["cpu_s"] / b["n_cells"]) / (a["cpu_s"] / a["n_cells"]), 3),
                    "cells_per_tissue_mpx_ratio": round((b["n_cells"] / b["tissue_mpx"]) / (a["n_cells"] / a["tissue_mpx"]), 3),
                    "peak_rss_ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
                    "wall_s_per_tissue_mpx_ratio": round(b["s_per_tissue_mpx"] / a["s_per_tissue_mpx"], 3),
                    "flat_within_15pct": bool(abs(b["s_per_tissue_mpx"] / a["s_per_tissue_mpx"] - 1) <= 0.15
                                              and abs(b["peak_rss_mib"] / a["peak_rss_mib"] - 1) <= 0.15)}
                # a real 2 Gpx slide: 2-4 M cells (the 1-2 M per Gpx) at the measured CPU cost per cell
                s["extrapolated_2gpx_2to4M_cells_h_quiet_2_cores"] = [
                    round(b["cpu_s"] / b["n_cells"] * m / 2 / 3600, 2) for m in (2e6, 4e6)]
            if rs[0].get("cpu_s_per_tissue_mpx") and rs[-1].get("cpu_s_per_tissue_mpx"):
                s["flatness_cpu_s_per_mpx_largest_vs_smallest"] = round(
                    rs[-1]["cpu_s_per_tissue_mpx"] / rs[0]["cpu_s_per_tissue_mpx"], 3)
            s["flatness_peak_rss_largest_vs_smallest"] = round(rs[-1]["peak_rss_mib"] / rs[0]["peak_rss_mib"], 3)
        summary[seg] = s
    out["summary"] = summary
    out["kill_and_resume"] = [json.loads(p.read_text()) for p in sorted(res_dir.glob("*_killed.json"))]
    old = sorted(res_dir.parent.glob("old/*gpx.json"))
    if old:  # the same runs earlier, at another load: how much the wall time moves with the machine's load
        out["earlier_runs_wall_only"] = [
            {k: json.loads(p.read_text()).get(k) for k in ("segmenter", "gigapixels", "seconds", "s_per_tissue_mpx",
                                                           "n_cells", "peak_rss_mib", "loadavg_end")} for p in old]
    out["slides"] = {}
    for info in sorted(res_dir.parent.glob("slides/*.json")):
        d = json.loads(info.read_text())
        out["slides"][info.stem] = {"file_bytes": d["file_bytes"], "build_s": d["build_s"], "levels_as": d.get("levels_as"),
                                    "openslide": d["openslide"], "ghist_open_slide": d["ghist_open_slide"]}
    return out


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cohort(device: str, segmenter: str | None, n_slides: int = 8) -> dict:
    from PIL import Image

    from ghist_core.pipeline.cohort import ManifestRow, run_cohort
    from ghist_core.io.slide import open_slide

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        with open_slide(REPO / "demo" / "CMU-1-Small-Region.svs") as s:
            # 8 crops whose centres are on tissue (from the slide's own tissue mask)
            mask, (dx, dy) = s.tissue_mask(256)
            ys, xs = np.nonzero(mask)
            pick = np.linspace(0, len(xs) - 1, n_slides).astype(int)
            for i, j in enumerate(pick):
                x = int(np.clip(xs[j] * dx - 256, 0, s.dimensions[0] - 512))
                y = int(np.clip(ys[j] * dy - 256, 0, s.dimensions[1] - 512))
                p = Path(tmp) / f"slide{i}.png"
                Image.fromarray(s.read_region((x, y), 0, (512, 512))).save(p)
                rows.append(ManifestRow(str(p), f"P{i}", 0.499))
        for workers in (1, 2):
            t = time.perf_counter()
            summary = run_cohort(rows, Path(tmp) / f"project_{workers}", n_workers=workers, device=device,
                                 segmenter_id=segmenter, model_id=_model_for(segmenter), echo=lambda _l: None)
            out[f"workers_{workers}_s"] = round(time.perf_counter() - t, 2)
            out[f"workers_{workers}_finished"] = summary["finished"]
    out["slides"] = n_slides
    out["segmenter"] = segmenter or "learned (bundled)"
    out["speedup_2_vs_1"] = round(out["workers_1_s"] / out["workers_2_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("SLIDE", "DEVICE", "SEGMENTER", "MPP"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slide", default=str(REPO / "demo" / "CMU-1-Small-Region.svs"))
    parser.add_argument("--skip-cohort", action="store_true")
    parser.add_argument("--gigapixel", type=float, default=0.0, help="also run a synthetic slide of this many gigapixels")
    parser.add_argument("--out", default=None)
    parser.add_argument("--eta", action="store_true", help="only the time-left check (sets the 'eta' key, keeps the rest)")
    parser.add_argument("--eta-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--eta-segmenter", default="learned")
    parser.add_argument("--eta-block-um", type=float, default=128.0)
    parser.add_argument("--scaling", action="store_true",
                        help="only the scaling series (sets the 'scaling' key, keeps the rest; resumable: finished runs are cached)")
    parser.add_argument("--scaling-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--scaling-sizes", default="0.02,0.1", help="gigapixels, comma-separated")
    parser.add_argument("--scaling-segmenters", default="classical,learned")
    parser.add_argument("--scaling-budget-s", type=float, default=None,
                        help="skip a run whose time extrapolated from a finished one of the same segmenter exceeds this")
    parser.add_argument("--scaling-kill-resume", default=None, metavar="SEGMENTER:GPX",
                        help="after the series: kill a run of that slide half-way, resume it, compare with the uninterrupted run")
    parser.add_argument("--only-cohort", action="store_true", help="rerun the cohort part, keep the rest of the file")
    parser.add_argument("--cohort-segmenter", default="classical",
                        help="segmenter for the cohort scaling run ('classical' is what the app uses on a CPU)")
    args = parser.parse_args()
    if args.eta_child:
        slide, device, seg, block_um = args.eta_child
        print(json.dumps(_eta_run(slide, device, None if seg == "-" else seg, float(block_um))))
        return
    if args.scaling_child:
        slide, seg, key = args.scaling_child
        print(json.dumps(_scaling_run(slide, seg, key)))
        return
    if args.child:
        slide, device, seg, mpp = args.child
        print(json.dumps(_one_run(slide, device, None if seg == "-" else seg, None if mpp == "-" else float(mpp))))
        return

    from ghist_core.paths import DEFAULT_SEGMENTER
    from ghist_core.weights.resolve import list_models

    out = Path(args.out) if args.out else REPO / "bench" / "results" / ("pipeline.json" if args.device == "cpu" else f"pipeline_{args.device}.json")
    if args.eta:
        results = json.loads(out.read_text()) if out.is_file() else {}
        r = _eta_bench(args.slide, args.device, args.eta_segmenter, args.eta_block_um)
        results["eta"] = r
        for k, v in r["points"].items():
            print(f"eta at {k:>4}: predicted {v.get('predicted_left_s')} s, actual {v['actual_left_s']} s, "
                  f"error {v.get('error')}, range {v.get('range_s')}, old rule error {v.get('old_rule_error')}")
        print(f"goal met: {r['goal_met']}")
        out.write_text(json.dumps(results, indent=2) + "\n")
        return
    if args.scaling:
        sizes = [float(v) for v in args.scaling_sizes.split(",")]
        r = _scaling(sizes, args.scaling_segmenters.split(","), args.scaling_budget_s)
        if args.scaling_kill_resume:
            seg, gpx = args.scaling_kill_resume.split(":")
            k = _scaling_kill_resume(float(gpx), seg)
            print(f"kill and resume: identical output {k['identical_output']}, killed at {k['blocks_done_at_kill']}/{k['blocks']} blocks")
            r = _scaling_summary(SCALING_WORK / "results")
        results = json.loads(out.read_text()) if out.is_file() else {}  # re-read: other modes may have written
        results["scaling"] = r
        print(json.dumps(r["summary"], indent=1))
        out.write_text(json.dumps(results, indent=2) + "\n")
        return
    if args.only_cohort:
        results = json.loads(out.read_text())
        results["cohort"] = _cohort(args.device, args.cohort_segmenter)
        print(f"cohort: {results['cohort']}")
        out.write_text(json.dumps(results, indent=2) + "\n")
        return

    learned_seg = any(m.get("name") == DEFAULT_SEGMENTER for m in list_models())
    kept = json.loads(out.read_text()) if out.is_file() else {}  # the --eta and --scaling blocks stay,
    keep = ("eta", "scaling", "cohort") if args.skip_cohort else ("eta", "scaling")  # and the cohort when skipped
    results: dict = {**{k: kept[k] for k in keep if k in kept},
                     "device": args.device, "machine": platform.processor() or platform.machine(), "slides": {}}
    if args.device == "cuda":
        import torch

        results["card"] = torch.cuda.get_device_name(0)
    for label, seg in (("classical_baseline", "classical"), ("ghist_studio", None if learned_seg else "classical")):
        r = _child([args.slide, args.device, seg or "-", "-"])
        results["slides"][label] = r
        print(f"{label:20s} {r['seconds']:8.1f} s  {r['n_cells']:7d} cells  {r['mpx_per_s']:.3f} Mpx/s  "
              f"peak {r['peak_rss_mib']:.0f} MiB  stages {r['stages_s']}")
    if args.gigapixel:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            big = make_gigapixel_tiff(Path(tmp) / "gigapixel.tif", args.gigapixel)
            made = time.perf_counter() - t
            r = _child([str(big), args.device, "-" if learned_seg else "classical", "0.25"])
        r["slide"] = f"synthetic {args.gigapixel:g} Gpx pyramidal TIFF at 0.25 um/px (demo tissue tiled; made in {made:.0f} s)"
        results["slides"]["gigapixel"] = r
        print(f"{'gigapixel':20s} {r['seconds']:8.1f} s  {r['n_cells']:7d} cells  {r['mpx_per_s']:.3f} Mpx/s  "
              f"peak {r['peak_rss_mib']:.0f} MiB  stages {r['stages_s']}")
    base, ours = results["slides"]["classical_baseline"], results["slides"]["ghist_studio"]
    results["ratio_seconds_ours_vs_classical"] = round(ours["seconds"] / base["seconds"], 2)
    print(f"ratio (ours / classical baseline, seconds): {results['ratio_seconds_ours_vs_classical']}")
    if not args.skip_cohort:
        results["cohort"] = _cohort(args.device, args.cohort_segmenter)
        print(f"cohort: {results['cohort']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
