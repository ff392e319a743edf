"""Upload & predict: add slides to the project, run them, watch the runs live.

Runs execute in a worker process recorded in the project store (``ghist_core.pipeline.worker``), so
this page only submits and polls: a browser refresh or a rerun loses nothing, and a
rerun never restarts a finished run (runs start only from a button).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ghist_core.errors import GhistError, MissingMppError, SlideError
from ghist_core.project import RunStatus, overview, slides, uploads
from ghist_core.safe_text import plain
from ghist_core.export.downloads import human_size
from ghist_core.project.runs import run_nucleus_scale, run_uncertainty
from ghist_core.weights.card import (chosen_card, is_expression_model, model_cell_inputs, model_members,
                                     is_stain_robust, run_segmenter, segmenter_card, segmenter_choices,
                                     trained_segmenter)
from pages import common as c

c.init_session()
c.ensure_demo_on_first_start()
if st.session_state.pop("upload_goto_map", False):
    st.switch_page("pages/gene_maps.py")

st.title("Upload & predict")
project = c.open_project_or_stop()
st.caption(f"Project: {plain(project.folder)}")
# Every upload state below belongs to this project (its files are staged in its folder): kept per
# project, so a question asked in one ("update slide 1?") is never shown, or answered, in another.
_ns = c.project_key(project.folder)
if f"upload_swept_{_ns}" not in st.session_state:  # once per session: copies a closed tab left behind
    st.session_state[f"upload_swept_{_ns}"] = uploads.sweep_staged_uploads(project.folder)

# --- model and device -----------------------------------------------------------------
with st.expander("Model and device", expanded=False):
    models = c.cached_models()
    names = ["bundled default"] + [f"{m['model_id']}" if m["source"] != "bundled" else m["name"] for m in models
                                   if is_expression_model(m)]
    choice = st.selectbox("Model", names, key="upload_model", help="The GHIST model that predicts expression.")
    st.session_state[c.MODEL_ID] = None if choice == "bundled default" else choice
    from ghist_core.device import device_summary

    dev = device_summary()
    options = ["auto", "cpu"] + (["cuda"] if dev.get("cuda_available") else [])
    current = st.session_state[c.DEVICE] if st.session_state[c.DEVICE] in options else "auto"
    st.session_state[c.DEVICE] = st.radio("Device", options, index=options.index(current), horizontal=True,
                                          key="upload_device",
                                          help="auto picks a CUDA GPU when there is one, else the CPU.")
    st.caption("CUDA GPU: " + (dev.get("cuda_device", "available") if dev.get("cuda_available") else "not available"))
    learned = dict(segmenter_choices(models))
    seg_opts = ["auto", *learned, "classical"]
    if st.session_state[c.SEGMENTER] not in seg_opts:  # e.g. a choice from an older session
        st.session_state[c.SEGMENTER] = "auto"
    card = chosen_card(models, st.session_state[c.MODEL_ID])
    try:  # "auto" gives this model the segmenter its nucleus types were trained on (own), else the default
        own, auto = trained_segmenter(card), run_segmenter(None, card)
    except GhistError as exc:
        st.error(str(exc), icon=":material/error:")
        own, auto = None, c.DEFAULT_SEGMENTER
    labels = {"auto": f"auto ({auto})", "classical": "fast classical", **learned}
    st.session_state[c.SEGMENTER] = st.radio(
        "Nuclei segmentation", seg_opts, index=seg_opts.index(st.session_state[c.SEGMENTER]), horizontal=True,
        key="upload_segmenter", format_func=labels.get,
        help="Learned models: CoNSeP AJI about 0.5 against 0.21 for the classical one. On 2 CPU cores a whole "
             "run takes about 10-11 s per mm² of tissue, 7-8 s of it segmentation (the classical segmenter is 3-4x "
             "faster; README, 'Speed'). A stain-robust model was also trained on re-stained images and "
             "holds up better on slides from other labs and scanners (README, 'Stain shift').")
    reads = model_cell_inputs(models, st.session_state[c.MODEL_ID])
    if own and st.session_state[c.SEGMENTER] in learned and st.session_state[c.SEGMENTER] != own:
        robust = is_stain_robust(segmenter_card(models, st.session_state[c.SEGMENTER]))
        own_robust = is_stain_robust(segmenter_card(models, own))
        st.info(f"This model was trained on the nucleus types of {own}; {st.session_state[c.SEGMENTER]} gives "
                "different types (on HER2ST nuclei they agree for about a third), so expect different expression."
                + (" It segments slides from other labs and scanners better." if robust and not own_robust else
                   " It also holds up less well on slides from other labs and scanners (README, 'Stain shift')."
                   if own_robust and not robust else ""),
                icon=":material/info:")
    if reads and st.session_state[c.SEGMENTER] == "classical":
        st.warning("This model also reads each nucleus' type probabilities from the learned segmenter, which the "
                   "fast classical segmenter does not give: runs with it would be refused. Choose auto or a learned model.",
                   icon=":material/warning:")
    # per-cell uncertainty: the spread of the model's ensemble members (seeds), only when it has several
    members = model_members(models, st.session_state[c.MODEL_ID])
    if members < 2:
        st.session_state["upload_uncertainty"] = False  # a one-member model cannot give it: never left ticked
    uncertainty = st.checkbox(
        "Per-cell uncertainty (about 3× slower prediction)", key="upload_uncertainty", disabled=members < 2,
        help=(f"Also runs the model's {members} members (the same model trained {members} times with different "
              "random seeds) and records, for each cell, how much they disagree: the spread of their predicted "
              "expression, averaged over the genes. High values mark cells whose prediction is less certain; "
              "Gene maps can show it as a map. The expression itself is unchanged. The expression step takes "
              f"about {members}× as long." if members > 1 else
              "Not available for this model: it has one member. Per-cell uncertainty compares several copies of "
              "the model trained with different seeds, so it needs a model with ensemble members."))
    uncertainty = bool(uncertainty) and members > 1
    # the learned segmenter's scale check (on by default): off reads every block at the stated µm/px
    check_scale = st.checkbox(
        "Check the nucleus scale (recommended)", value=True, key="upload_nucleus_scale",
        help="Where nuclei look larger than the ones the segmenter was trained on (large tumour nuclei, or a "
             "µm per pixel that is too large), it segments that region at 2/3 scale instead of cutting the "
             "nuclei into pieces; Gene maps then says how many. Untick only when you trust the slides' µm per "
             "pixel and want the speed (about 20% faster segmentation). The learned segmenters only. A slide "
             "that already has a finished run is not run again when ticked; unticked, only a run made without "
             "the check counts.")
    # None: the default for a new run, and any finished run counts (as for `ghist predict` without the option)
    nucleus_scale = None if check_scale or st.session_state[c.SEGMENTER] == "classical" else 1.0

# --- upload ------------------------------------------------------------------------------
st.subheader("1 · Add slides")
# The uploader is an inbox: each file is streamed to a staging file on disk, its bytes are dropped from
# the server's memory at once (Streamlit would otherwise hold every upload as one ``bytes`` until the
# server restarts), and a fresh, empty uploader replaces it; the cards below work on the staged copies.
generation = st.session_state.setdefault("upload_generation", 0)
files = st.file_uploader(
    "Whole-slide images or H&E images (SVS, NDPI, TIFF, OME-TIFF, PNG, JPEG)",
    type=c.UPLOAD_TYPES, accept_multiple_files=True, key=f"upload_files_{generation}",
)
staged: dict = st.session_state.setdefault(f"upload_staged_{_ns}", {})  # file id -> StagedUpload (on disk)
file_names: dict = st.session_state.setdefault(f"upload_names_{_ns}", {})  # file id -> the user's file name, in upload order
added: dict = st.session_state.setdefault(f"upload_added_{_ns}", {})  # file id -> (slide id, patient, state, note)
mpp_answers: dict = st.session_state.setdefault(f"upload_mpp_{_ns}", {})  # file id -> µm/px the user typed
known: dict = st.session_state.setdefault(f"upload_known_{_ns}", {})  # file id -> slide id already holding the file
pending: dict = st.session_state.setdefault(f"upload_pending_{_ns}", {})  # file id -> re-upload waiting for "update?"
prefilled: set = st.session_state.setdefault(f"upload_prefilled_{_ns}", set())  # file ids given the project's µm/px
if files:
    for f in files:
        fid = getattr(f, "file_id", None) or f"{f.name}:{f.size}"
        if fid not in staged and fid not in added and fid not in pending:
            try:
                staged[fid] = uploads.stage_upload(f.name, f, uploads.staging_dir(project.folder))
            except OSError as exc:
                st.session_state.setdefault("upload_errors", []).append(
                    f"Could not store the upload {plain(f.name)} for checking ({plain(exc.strerror or 'disk error')}).")
            else:
                file_names[fid] = f.name
        c.release_upload(f)
    st.session_state["upload_generation"] = generation + 1
    st.rerun()
for message in st.session_state.pop("upload_errors", []):
    st.error(message)


def _forget(fid: str) -> None:
    """The user removed an upload that was not added: delete its staged copy and its answers."""
    if fid in staged:
        uploads.discard_staged(staged.pop(fid))
    for store in (mpp_answers, known, pending, added, file_names):
        store.pop(fid, None)
    prefilled.discard(fid)


def _remember_mpp(fid: str) -> None:
    """The µm/px prompt was answered: remember it, so the prompt goes away."""
    value = st.session_state.get(f"mpp_{fid}")
    if value:
        mpp_answers[fid] = float(value)


def _start_run_if_wanted(slide_id: int, run_now: bool) -> None:
    """Start a run unless the slide already has a finished or active one (no redundant runs); with the
    uncertainty ticked, a finished run made without it does not count, and with the scale check
    unticked, one made with it does not."""
    if run_now and overview.wants_run(project, slide_id, uncertainty=uncertainty, nucleus_scale=nucleus_scale):
        try:
            c.submit(project, slide_id, uncertainty=uncertainty, nucleus_scale=nucleus_scale)
        except GhistError as exc:
            st.error(plain(exc))
            st.stop()


_MESSAGES = {"added": "added as slide {sid}", "exists": "already in the project as slide {sid}; nothing was copied",
             "updated": "slide {sid} updated", "kept": "already in the project as slide {sid}, kept as it was"}

for fid, name in list(file_names.items()):
    if fid in added:
        sid, pid, state, note = added[fid]
        if state == "failed":
            st.error(f"{plain(name)} was not added: {plain(note)}", icon=":material/error:")
            continue
        (st.success if state in ("added", "updated") else st.info)(
            f"{plain(name)}: {_MESSAGES[state].format(sid=sid)} (patient {plain(pid or '—')}). {plain(note)}".strip(),
            icon=":material/check_circle:")
        continue
    if fid in pending:  # a re-upload that differs from its slide: update it, or keep it as it is
        p = pending[fid]
        edit = project.plan_slide_edit(p["slide_id"], mpp=p["mpp"], patient_id=p["patient"] or slides.KEEP)
        with st.container(border=True):
            st.warning(f"**{plain(name)}** is already in the project as slide {p['slide_id']}, but "
                       + plain("; ".join(p["diffs"])) + ". Update the slide? " + plain(edit.describe()),
                       icon=":material/help:")
            b = st.columns(2)
            if b[0].button(f"Update slide {p['slide_id']}", type="primary", key=f"update_{fid}"):
                try:
                    done = project.update_slide(p["slide_id"], mpp=p["mpp"], patient_id=p["patient"] or slides.KEEP)
                except GhistError as exc:
                    st.error(plain(exc))
                else:
                    pending.pop(fid)
                    n = len(done.run_ids) if done.mpp_changed else 0
                    note = f"{n} earlier run{'s' if n != 1 else ''} deleted (old µm/px)." if n else ""
                    added[fid] = (done.slide_id, done.new_patient_id, "updated", note)
                    _start_run_if_wanted(done.slide_id, p["run_now"])
                    st.rerun()
            if b[1].button("Keep the slide as it is", key=f"keep_{fid}"):
                pending.pop(fid)
                rec = project.get_slide(p["slide_id"])
                added[fid] = (rec.slide_id, rec.patient_id, "kept", "")
                st.rerun()
        continue
    if fid not in staged:  # removed (or refused and dropped) in an earlier run
        continue
    s = staged[fid]
    if fid not in known:
        rec = project.find_slide_for_file(s.path)
        known[fid] = None if rec is None else int(rec.slide_id)
    existing = project.get_slide(known[fid]) if known[fid] is not None else None
    with st.container(border=True):
        head = st.columns([5, 1])
        head[0].markdown(f"**{plain(name)}** · {human_size(s.size_bytes)}")
        head[1].button("Remove", key=f"remove_{fid}", on_click=_forget, args=(fid,),
                       help="Take this file back out without adding it (its uploaded copy is deleted).")
        if existing is not None:
            st.caption(f"Already in the project as slide {existing.slide_id} (patient {plain(existing.patient_id or '—')}, "
                       f"{existing.mpp:.4g} µm per px). A different µm per px or patient id updates that slide.")
        mpp_given = mpp_answers.get(fid)
        try:
            info = uploads.inspect_upload(s.path, mpp=mpp_given, name=name)
        except MissingMppError as exc:
            if existing is not None and fid not in prefilled:  # the project knows this file's µm/px:
                prefilled.add(fid)                                 # not asked again (once: "Change" asks)
                mpp_answers[fid] = float(existing.mpp)
                st.rerun()
            st.warning(plain(exc))
            st.number_input("µm per pixel at full resolution", min_value=0.01, max_value=50.0, value=None,
                            step=0.01, format="%.4f", key=f"mpp_{fid}", on_change=_remember_mpp, args=(fid,),
                            help="Typically 0.25 (40× objective) or 0.5 (20×). It sets how large nuclei look "
                                 "to the segmenter: a value 2× too large makes them look twice their size, "
                                 "which costs it about a third of its accuracy (README, scale shift).")
            continue
        except SlideError as exc:
            mpp_answers.pop(fid, None)
            st.error(plain(exc))
            continue
        cols = st.columns([1, 2])
        cols[0].image(info["thumbnail"], caption="thumbnail", width="stretch")
        cols[1].markdown(
            f"- **Size:** {info['width_px']:,} × {info['height_px']:,} px "
            f"({info['width_um'] / 1000:.2f} × {info['height_um'] / 1000:.2f} mm)\n"
            f"- **Resolution:** {info['mpp']:.4f} µm per px ({info.get('mpp_source') or 'given'})\n"
            f"- **Format:** {plain(info['format'])} {plain(info.get('vendor') or '')}"
        )
        if note := uploads.small_image_note(info):
            cols[1].warning(plain(note), icon=":material/photo_size_select_small:")
        if mpp_given is not None and cols[1].button("Change µm per pixel", key=f"mppchange_{fid}"):
            mpp_answers.pop(fid, None)
            st.rerun()
        default_patient = (existing.patient_id if existing is not None and existing.patient_id
                           else Path(name).stem.split(".")[0][:32])
        patient = cols[1].text_input("Patient id", value=default_patient, key=f"patient_{fid}",
                                     help="Slides with the same patient id are grouped in cohort analyses.")
        run_now = cols[1].checkbox("Run the prediction right away", value=True, key=f"runnow_{fid}")
        if cols[1].button("Add to project", type="primary", key=f"add_{fid}"):
            pid = patient.strip() or None
            try:
                result = uploads.add_staged_upload(project, s, patient_id=pid, mpp=mpp_given)
            except GhistError as exc:  # the staged copy is gone: keep the message as the file's line
                staged.pop(fid, None)
                added[fid] = (None, pid, "failed", str(exc))
                st.rerun()
            else:
                staged.pop(fid, None)
                record = result.record
                st.session_state[c.SELECTED_SLIDE] = int(record.slide_id)
                diffs = [] if result.is_new else slides.upload_differences(record, mpp=mpp_given, patient_id=pid)
                if diffs:  # ask before changing the slide (and before any run)
                    pending[fid] = {"slide_id": int(record.slide_id), "mpp": mpp_given, "patient": pid,
                                    "run_now": run_now, "diffs": diffs}
                else:
                    added[fid] = (int(record.slide_id), record.patient_id, "added" if result.is_new else "exists", "")
                    _start_run_if_wanted(int(record.slide_id), run_now)
                st.rerun()  # redraw: the card becomes a one-line confirmation (or the question)

if added:
    st.button("Clear these messages", key="upload_clear_added", on_click=lambda: [_forget(k) for k in list(added)])

# --- slides waiting for a run -------------------------------------------------------------
st.subheader("2 · Runs")
if len(project.list_slides()) == 0:
    st.info("No slides in this project yet.")
for _, row in overview.slides_not_run(project).iterrows():
    cols = st.columns([3, 1])
    cols[0].markdown(f"{plain(c.slide_label(row))} — not run yet")
    if cols[1].button("Run", key=f"run_{row['slide_id']}"):
        try:
            c.submit(project, int(row["slide_id"]), uncertainty=uncertainty, nucleus_scale=nucleus_scale)
        except GhistError as exc:
            st.error(plain(exc))


# Poll only while a run is active: eight idle sessions each re-running this fragment every
# second saturated a small server and made it drop file uploads (tests/app/test_concurrent_users.py).
_active = overview.any_active(project.list_runs())


@st.fragment(run_every=c.POLL_S if _active else None)
def live_runs() -> None:
    """Poll the store for every run of this project; only this fragment reruns."""
    from ghist_core.pipeline import worker as jobs

    proj = c.open_project()
    proj.mark_interrupted_runs()  # a worker that died shows up as resumable
    latest = overview.latest_runs(proj)
    if len(latest) == 0:
        st.caption("No runs yet.")
        return
    if _active and not overview.any_active(proj.list_runs()):
        # every run has ended: one full rerun stops the polling, so the buttons that now
        # appear ("Open gene map", "Resume") are not redrawn under the user's click each second
        st.rerun(scope="app")
    names = {int(r["slide_id"]): c.slide_label(r) for _, r in proj.list_slides().iterrows()}
    for _, run in latest.iterrows():
        rid, status = int(run["run_id"]), RunStatus(run["status"])
        label = names.get(int(run["slide_id"]), f"slide {run['slide_id']}")
        with st.container(border=True, key=f"runbox_{rid}"):
            extra = " · with per-cell uncertainty" if run_uncertainty(run.get("params")) else ""
            extra += "" if run_nucleus_scale(run.get("params")) == "auto" else " · nucleus scale check off"
            st.markdown(f"**{plain(label)}** · run {rid} · **{status}**{extra}")
            if status.is_active:
                progress = float(run.get("progress") or 0.0)
                stage = run.get("stage") or RunStatus.QUEUED
                left = overview.time_left(proj, run)  # a range from measured blocks; never counts up
                st.progress(min(1.0, progress), text=f"{stage}: {progress:.0%} · "
                            f"{left.text() if left is not None else 'time left: estimating…'}")
                if run.get("message"):
                    st.caption(plain(run["message"]))
                if st.button("Cancel", key=f"cancel_{rid}", icon=":material/stop:"):
                    jobs.cancel_run(proj.folder, rid)
                    st.toast(f"Cancelling run {rid}: finished blocks are kept.")
            elif status is RunStatus.FINISHED:
                n = run.get("n_cells")
                st.progress(1.0, text=f"finished · {int(n):,} cells" if n == n and n is not None else "finished")
                if note := c.stain_note(proj.result_files(rid).get("h5ad")):  # stain outside what was tested
                    st.warning(plain(note), icon=":material/palette:")
                if st.button("Open gene map", key=f"open_{rid}", icon=":material/map:"):
                    # switch_page from inside a fragment leaves a blank page: hand over to a full run
                    st.session_state[c.SELECTED_SLIDE] = int(run["slide_id"])
                    st.session_state["upload_goto_map"] = True
                    st.rerun(scope="app")
            elif status.is_resumable:
                why = run.get("error") or run.get("message")
                if status is RunStatus.CANCELLED:  # its last progress line alone read like a warning
                    st.warning("Cancelled. Its finished blocks are kept: Resume continues after the last one"
                               + (f" (it had reached {plain(why)})." if why else "."))
                elif why:
                    (st.error if status is RunStatus.FAILED else st.warning)(plain(why))
                if st.button("Resume", key=f"resume_{rid}", icon=":material/replay:",
                             help="Continue from the last finished block."):
                    try:
                        jobs.resume_run(proj.folder, rid, device=st.session_state[c.DEVICE])
                    except GhistError as exc:
                        st.error(plain(exc))
                    else:
                        st.rerun(scope="app")


live_runs()
