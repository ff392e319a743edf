"""The ``ghist`` command: predict slides, run a cohort on Dask, manage weights.

Exit codes a scripter can rely on:
0 all done; 1 some slides failed (the rest finished); 2 bad command line;
3 bad input (slide, manifest, weights, --mpp, --project: the message says which);
4 busy: no slide failed, but another process is running one of them now (its run is in the
project; run again later, or pass ``--wait``); 130 interrupted.

``ghist predict`` resumes rather than redoes: a slide's latest run with the same model and
segmenter is reported as it is when finished, and continued from its checkpoints when it was
interrupted (a killed run is recognised by its dead process), failed or cancelled;
``--new-run`` always starts a fresh one. ``--uncertainty`` asks for the per-cell expression
uncertainty: a finished run made without it is then not reused (a new run starts), while a run
made with it also answers a request without it (the same expression). A slide is computed by one process at a time (a
lock per slide under the project, released by the system when the process dies).

Privacy: progress and error messages name a slide by its project id, or by its position
on the command line ("input 2") before it has one, never by its file name or patient id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ghist_core.errors import GhistError, InvalidMppError, SlideBusyError, StoreError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INPUT, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _tqdm_progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}", file=sys.stderr)

    def callback(event) -> None:
        bar.n = round(event.overall * 100, 1)
        eta = ""
        if event.eta_s is not None:  # a range from measured seconds per tissue area (pipeline.eta)
            from ghist_core.project.overview import TimeLeft

            lo, hi = event.eta_low_s, event.eta_high_s
            eta = TimeLeft(event.eta_s if lo is None else lo, event.eta_s, event.eta_s if hi is None else hi).text()
        bar.set_postfix_str(f"{event.stage}: {eta + ' · ' if eta else ''}{event.message}"[:80])
        bar.refresh()

    return bar, callback


def _nucleus_scale_arg(value: str | None) -> float | str | None:
    """``--nucleus-scale``: None (not given), "auto" or a factor; anything else a ModelInputError (exit 3)."""
    from ghist_core.errors import ModelInputError
    from ghist_core.pipeline.worker import checked_nucleus_scale

    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise ModelInputError(f"--nucleus-scale must be 'auto' or a number between 0.1 and 10, not {value!r}.") from None
    return checked_nucleus_scale(number)


def _check_predict_args(args: argparse.Namespace) -> tuple[float | None, str | None]:
    """Refuse a bad --mpp, --patient or --nucleus-scale before anything is written (exit 3)."""
    from ghist_core.io.slide import check_mpp
    from ghist_core.project.slides import check_patient_id

    mpp = check_mpp(args.mpp, "--mpp value (µm per pixel)") if args.mpp is not None else None
    try:
        patient = check_patient_id(args.patient) if args.patient is not None else None
    except StoreError:  # the message would repeat the id: say what is wrong without it
        raise StoreError("The --patient value is not a usable patient id (1–200 printable characters).") from None
    return mpp, patient


def _check_unchanged(record, patient: str | None, mpp: float | None) -> None:
    """A slide already in the project keeps its patient and scale: a different --patient/--mpp is refused."""
    if patient is not None and record.patient_id != patient:
        raise StoreError(
            f"Slide {record.slide_id} is already in this project, attached to another patient; --patient was not "
            "applied. Change its patient on the Home page, or run it without --patient.")
    if mpp is not None and abs(float(record.mpp) - mpp) > 1e-9 * max(1.0, mpp):
        raise InvalidMppError(
            f"Slide {record.slide_id} is already in this project at {record.mpp:g} µm per pixel; --mpp {mpp:g} was "
            "not applied (its results are at the recorded scale). Run it without --mpp, or delete the slide from "
            "the project first to add it at another scale.")


def cmd_predict(args: argparse.Namespace) -> int:
    from ghist_core.pipeline.worker import (identifying_strings, predict_slide_locked, redact, rescaled_share,
                                            stain_check, uncertainty_note)
    from ghist_core.project.runs import run_nucleus_scale
    from ghist_core.project.store import Project
    from ghist_core.project.overview import share_text

    mpp, patient = _check_predict_args(args)
    nucleus_scale = _nucleus_scale_arg(args.nucleus_scale)
    project = Project.open_or_create(args.project)
    failed = busy = 0
    n = len(args.slides)
    for i, slide_path in enumerate(args.slides, 1):
        record = None
        try:
            record = project.add_slide(Path(slide_path).absolute(), patient_id=patient, mpp=mpp)
            _check_unchanged(record, patient, mpp)
            bar, callback = _tqdm_progress(f"slide {record.slide_id}")
            try:
                done = predict_slide_locked(
                    project, record.slide_id, model_id=args.model, segmenter_id=args.segmenter, device=args.device,
                    progress=callback, new_run=args.new_run, wait=args.wait, uncertainty=args.uncertainty,
                    nucleus_scale=nucleus_scale,
                    on_wait=lambda pid, sid=record.slide_id: print(
                        f"slide {sid}: waiting for process {pid or '?'} to finish its run", file=sys.stderr))
            finally:
                bar.close()
            line = {"input": i, "slide": str(slide_path), "slide_id": record.slide_id, "run_id": done.run_id,
                    "action": done.action, "n_cells": done.n_cells, "h5ad": str(done.h5ad_path)}
            if args.uncertainty:  # what the column holds, or why the run went on without it (one member)
                note = uncertainty_note(done.h5ad_path) or "unavailable: this run did not record it"
                line["uncertainty"] = note
                if note.startswith("unavailable"):
                    print(f"note: slide {record.slide_id}: no expression uncertainty: {note}", file=sys.stderr)
            run = project.get_run(done.run_id)
            if run.params.get("segmenter_id") != "classical":
                line["nucleus_scale"] = run_nucleus_scale(run.params)
            stain = stain_check(done.h5ad_path)
            if stain is not None and "within_tested_range" in stain:
                line["stain_within_tested_range"] = bool(stain["within_tested_range"])
                if stain.get("note"):
                    print(f"note: slide {record.slide_id}: {stain['note']}", file=sys.stderr)
            share = rescaled_share(done.h5ad_path)
            if share is not None:
                line["nuclei_rescaled"] = share
                if share > 0:  # nuclei looked larger than the segmenter's training nuclei
                    print(f"note: slide {record.slide_id}: {share_text(share)} of the nuclei looked large and were segmented "
                          f"at a smaller scale (obs 'nucleus_scale'); if {record.mpp:.4g} µm per pixel is not this "
                          "slide's resolution, correct it (--mpp, in a new project) and run it again", file=sys.stderr)
            print(json.dumps(line))
        except GhistError as exc:
            label = f"slide {record.slide_id}" if record is not None else f"input {i}" + (f" of {n}" if n > 1 else "")
            message = redact(str(exc), identifying_strings(record, slide_path, patient), label)
            is_busy = isinstance(exc, SlideBusyError)
            busy += is_busy
            failed += not is_busy
            hint = " (or run again with --wait)" if is_busy else ""
            print(f"error: {label}: {message}{hint}", file=sys.stderr)
            print(json.dumps({"input": i, "slide_id": record.slide_id if record is not None else None,
                              "status": "busy" if is_busy else "failed", "error": message}))
    if failed == n:
        return EXIT_INPUT
    if failed:
        return EXIT_PARTIAL
    return EXIT_BUSY if busy else EXIT_OK


def cmd_cohort(args: argparse.Namespace) -> int:
    from ghist_core.pipeline.cohort import read_manifest, run_cohort

    manifest = read_manifest(args.manifest)
    nucleus_scale = _nucleus_scale_arg(args.nucleus_scale)  # refused (exit 3) before any worker starts
    summary = run_cohort(
        manifest,
        args.project,
        scheduler=args.scheduler,
        n_workers=args.workers,
        model_id=args.model,
        segmenter_id=args.segmenter,
        device=args.device,
        nucleus_scale=nucleus_scale,
        echo=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(summary, indent=1))
    if summary["failed"] and not summary["finished"]:
        return EXIT_INPUT
    return EXIT_PARTIAL if summary["failed"] else EXIT_OK


def cmd_weights(args: argparse.Namespace) -> int:
    from ghist_core.weights import resolve as weights

    if args.action == "list":
        for model in weights.list_models():
            print(json.dumps(model))
        return EXIT_OK
    if args.action == "pull":
        for resolved in weights.pull(args.model_id):
            print(json.dumps({"name": resolved.name, "path": str(resolved.weights_path), "sha256": resolved.sha256}))
        return EXIT_OK
    reports = weights.verify(args.model_id)
    for report in reports:
        print(json.dumps(report))
    return EXIT_OK if all(r.get("ok") for r in reports) else EXIT_INPUT


def cmd_export(args: argparse.Namespace) -> int:
    from ghist_core.errors import ExportError
    from ghist_core.export import export_project, export_slide
    from ghist_core.project.store import Project

    genes = [g for g in args.genes.split(",") if g.strip()] if args.genes else None
    if not args.all and Path(args.out).is_dir():
        raise ExportError(f"{args.out} is a folder: give a file name for one slide, or --all to write every "
                          "finished slide into a folder.")
    with Project.open(args.project) as project:
        try:
            if args.all:
                paths = export_project(project, args.format, args.out, genes=genes)
            else:
                paths = [export_slide(project, args.slide, args.format, args.out, genes=genes)]
        except OSError as exc:  # a read-only or full disk, a missing parent: said, not a traceback
            raise ExportError(f"Could not write {args.out} ({exc.strerror or exc}). Check that the folder "
                              "exists, is writable and has free space.") from None
    for path in paths:
        print(json.dumps({"format": args.format, "path": str(path)}))
    return EXIT_OK


NUCLEUS_SCALE_HELP = (
    "the learned segmenter's scale check: 'auto' segments regions whose nuclei look larger than its training "
    "nuclei at 2/3 scale (obs 'nucleus_scale'); 1 reads every region at the slide's µm per pixel (about 20%% "
    "faster where you trust it); another number reads the whole slide as that factor x the µm per pixel. Given, "
    "a finished or interrupted run made at another setting is not reused; not given, a new run uses 'auto' and "
    "an existing run is reused whatever its setting")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghist", description="GHIST Studio: gene expression and cell types from H&E slides.",
        epilog="exit codes: 0 done, 1 some slides failed, 2 bad command line, 3 bad input, "
               "4 a slide is being run by another process, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment nuclei and predict expression for one or more slides")
    p.add_argument("slides", nargs="+", help="slide files (SVS, NDPI, MRXS, TIFF, OME-TIFF, PNG, JPEG)")
    p.add_argument("--project", required=True, help="project folder (created if missing)")
    p.add_argument("--model", default=None, help="model id owner/repo@revision or a local folder (default: bundled)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--segmenter", default=None, help="nucleus segmenter: 'auto' (default: the one the model was trained on, else "
                        "nuclei-seg-stain), a bundled learned model (nuclei-seg-stain, nuclei-seg) or 'classical'")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel, required when the file does not say")
    p.add_argument("--patient", default=None, help="patient id to attach the slides to")
    p.add_argument("--new-run", action="store_true",
                   help="start a fresh run even when the slide has a finished or resumable one")
    p.add_argument("--wait", action="store_true",
                   help="when another process is running a slide, wait for it instead of exiting with code 4")
    p.add_argument("--uncertainty", action="store_true",
                   help="also record each cell's expression uncertainty (obs 'expression_uncertainty': how much the "
                        "model's ensemble members, trained with different seeds, disagree). Needs a model with "
                        "several members (a one-member model runs without it, with a note) and costs about 3x the "
                        "expression step")
    p.add_argument("--nucleus-scale", default=None, metavar="auto|FACTOR",
                   help=NUCLEUS_SCALE_HELP + " (the JSON line's nucleus_scale says which)")
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser("cohort", help="predict every slide of a manifest on a Dask cluster")
    c.add_argument("manifest", help="CSV with columns slide_path, patient_id and optionally mpp")
    c.add_argument("--project", required=True)
    c.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (default: a local cluster)")
    c.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster")
    c.add_argument("--model", default=None)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    c.add_argument("--segmenter", default=None, help="nucleus segmenter: 'auto' (default: the one the model was trained on, else "
                        "nuclei-seg-stain), a bundled learned model (nuclei-seg-stain, nuclei-seg) or 'classical'")
    c.add_argument("--nucleus-scale", default=None, metavar="auto|FACTOR", help=NUCLEUS_SCALE_HELP)
    c.set_defaults(func=cmd_cohort)

    w = sub.add_parser("weights", help="list, pull or verify model weights")
    w.add_argument("action", choices=["list", "pull", "verify"])
    w.add_argument("model_id", nargs="?", default=None, help="owner/repo@revision (pull/verify)")
    w.set_defaults(func=cmd_weights)

    e = sub.add_parser("export", help="export predictions for QuPath (geojson), scanpy (h5ad) or tables (csv, parquet)")
    e.add_argument("--project", required=True, help="project folder")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide", type=int, help="slide id (its latest finished run)")
    which.add_argument("--all", action="store_true", help="every slide with a finished run; --out is then a folder")
    e.add_argument("--format", required=True, choices=["geojson", "h5ad", "csv", "parquet"])
    e.add_argument("--out", required=True, help="output file (a folder with --all)")
    e.add_argument("--genes", default=None, help="comma-separated genes (default: all genes of the model)")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "weights" and args.action == "pull" and not args.model_id:
        parser.error("ghist weights pull needs a model id, e.g. ghist weights pull owner/repo@main")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GhistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
