"""Session-state keys and small helpers shared by every page (UI only, no analysis)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ghist_core.paths import default_project_dir

# Session keys, set once; every page uses these names.
PROJECT_DIR = "project_dir"
SELECTED_SLIDE = "selected_slide_id"
DEVICE = "device"
MODEL_ID = "model_id"


def init_session() -> None:
    """Fill missing session keys with their defaults (safe to call on every rerun)."""
    defaults = {
        PROJECT_DIR: str(default_project_dir() / "demo"),
        SELECTED_SLIDE: None,
        DEVICE: "auto",
        MODEL_ID: None,
    }
    for key, value in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = value


def project_dir() -> Path:
    init_session()
    return Path(st.session_state[PROJECT_DIR])
