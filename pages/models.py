"""Models: installed models and their cards, pull from the Hub, verify, choose the device."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from ghist_core.weights import resolve as weights
from ghist_core.device import device_summary
from ghist_core.errors import GhistError
from ghist_core.paths import DEFAULT_MODEL_REPO
from ghist_core.safe_text import plain
from pages import common as c

c.init_session()
st.title("Models")

# --- device ---------------------------------------------------------------------------------
dev = device_summary()
st.subheader("Compute device")
cols = st.columns(3)
cols[0].metric("CUDA GPU", "available" if dev.get("cuda_available") else "not available")
cols[1].metric("GPU", dev.get("cuda_device", "—"))
cols[2].metric("PyTorch", dev.get("torch", "?"))
options = ["auto", "cpu"] + (["cuda"] if dev.get("cuda_available") else [])
current = st.session_state[c.DEVICE] if st.session_state[c.DEVICE] in options else "auto"
st.session_state[c.DEVICE] = st.radio("Run predictions on", options, index=options.index(current), horizontal=True,
                                      key="models_device", help="auto: a CUDA GPU if there is one, otherwise the CPU.")

# --- installed ------------------------------------------------------------------------------
st.subheader("Installed models")
models = c.cached_models()
if not models:
    st.info("No models installed yet. Pull one from the Hub below.")
else:
    table = pd.DataFrame([{
        "name": m["name"], "kind": m.get("kind") or "—", "source": m["source"], "model id": m["model_id"],
        "size (MB)": round((m.get("size") or 0) / 1e6, 1), "sha256": (m.get("sha256") or "")[:16] + "…",
        "card": "bad: not used" if m.get("error") else "sealed",
    } for m in models])
    st.dataframe(table, hide_index=True, key="models_table", width="stretch")
    for m in models:
        if m.get("error"):  # the others are still listed; this one is named with the reason
            st.warning(f"{plain(m['name'])} ({plain(m['source'])}): {plain(m['error'])}")
            continue
        card = m.get("card") or {}
        with st.expander(f"{plain(m['name'])} — {plain(m.get('kind') or 'model')} ({plain(m['source'])})"):
            genes = card.get("genes") or card.get("gene_names") or []
            types = card.get("cell_types") or card.get("type_names") or []  # segmenters call them type_names
            cc = st.columns(3)
            cc[0].metric("Genes", len(genes))
            cc[1].metric("Cell types", len(types))
            cc[2].metric("Size", f"{(m.get('size') or 0) / 1e6:.1f} MB")
            if card.get("description"):
                st.markdown(plain(card["description"]))
            # the cards' own keys (an expression model: training, licence_note; a segmenter: data, training)
            for keys, title in ((("training_data", "data", "training"), "Training data"), (("metrics",), "Metrics"),
                                (("license", "licence", "licence_note"), "Licence")):
                key = next((k for k in keys if card.get(k)), None)
                if key is not None:
                    st.markdown(f"**{title}**")
                    if isinstance(card[key], (dict, list)):
                        st.json(card[key], expanded=False)
                    else:
                        st.markdown(plain(card[key]))
            if types:
                st.markdown("**Cell types:** " + ", ".join(map(plain, types)))
            if genes:
                st.markdown(f"**Genes ({len(genes)}):** " + ", ".join(map(plain, genes[:60])) + (" …" if len(genes) > 60 else ""))
            st.download_button("Model card (JSON)", data=json.dumps(card, indent=2, default=str), mime="application/json",
                               file_name=f"{m['name']}.json", key=f"card_{m['source']}_{m['name']}", on_click="ignore")

# --- verify -----------------------------------------------------------------------------------
st.subheader("Verify integrity")
if st.button("Verify all installed models", key="models_verify", icon=":material/verified:"):
    with st.spinner("Hashing weights files…"):
        try:
            rows = weights.verify()
        except GhistError as exc:
            st.error(plain(exc))
            rows = None
    if rows is not None:
        st.session_state["models_verify_rows"] = rows
rows = st.session_state.get("models_verify_rows")
if rows is not None:
    if not rows:
        st.info("Nothing to verify: no models are installed.")
    else:
        if all(r["ok"] for r in rows):
            st.success(f"All {len(rows)} files (weights and their cards) match the sha256 and seal in their model cards.")
        else:
            bad = [r for r in rows if not r["ok"]]
            st.error(f"{len(bad)} of {len(rows)} files do not match their model card: "
                     + "; ".join(plain(r["message"]) for r in bad))
        st.dataframe(pd.DataFrame(rows)[["name", "source", "file", "status"]], hide_index=True,
                     key="models_verify_table")

# --- pull ----------------------------------------------------------------------------------------
st.subheader("Pull from the Hugging Face Hub")
model_id = st.text_input("Model id (owner/repo or owner/repo@revision)", value=DEFAULT_MODEL_REPO, key="models_pull_id")
if st.button("Pull", key="models_pull", icon=":material/download:"):
    bar = st.progress(0.0, text="contacting the Hub…")

    def progress(fraction: float, message: str) -> None:  # ghist_core._types.ProgressCallback
        bar.progress(min(1.0, fraction), text=plain(message))

    try:
        got = weights.pull(model_id.strip(), progress=progress)
    except GhistError as exc:
        bar.empty()
        st.error(plain(exc))
    else:
        bar.progress(1.0, text="done")
        st.success("Pulled and verified: " + ", ".join(f"{plain(r.name)} ({r.sha256[:12]}…)" for r in got))
        c.cached_models.clear()
