"""Data text never becomes markup: hostile patient ids, file names, table cells, gene names and
model-card fields render as literal text on the pages and in the deck.gl tooltip.

A patient id ``![x](http://host/p.png)`` rendered as markdown makes every viewer's browser fetch that
URL; a gene called ``<img src=x onerror=...>`` in the tooltip's ``innerHTML`` runs a script.
"""

from __future__ import annotations

import html
import json
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from streamlit.testing.v1 import AppTest

from apptest_kit import open_page, open_page_alone
from ghist_core.safe_text import html_text, plain

IMG_MD = "![x](http://127.0.0.1:9/p.png)"
IMG_HTML = "<img src=x onerror=alert(7)>"
HOSTILE = [IMG_MD, IMG_HTML, "[link](javascript:alert(1))", "**bold** _it_ `code`", "$x^2$", ":red[red] :material/home:",
           "# heading\n- item\n1. one", "<script>alert(1)</script>", "a | b\n--|--\nc | d", "\\![x](y)", "&lt;b&gt;"]
_PUNCT = set(string.punctuation)


def _unescaped_specials(md: str) -> list[str]:
    """ASCII punctuation in ``md`` that is not backslash-escaped (what markdown could interpret)."""
    out, i = [], 0
    while i < len(md):
        if md[i] == "\\":
            i += 2
            continue
        if md[i] in _PUNCT:
            out.append(md[i])
        i += 1
    return out


def _shown(md: str) -> str:
    """The text a reader sees for backslash-escaped markdown."""
    return re.sub(r"\\(.)", r"\1", md).replace("\u2060", "")


# ------------------------------------------------------------------------------ the helpers
@pytest.mark.parametrize("text", HOSTILE)
def test_plain_leaves_nothing_for_markdown_to_interpret(text: str) -> None:
    md = plain(text)
    assert _unescaped_specials(md) == []
    assert "\n" not in md and _shown(md) == text.replace("\n", " ")  # the reader sees exactly the text
    assert "![" not in md and re.search(r"(?<!\\)<", md) is None  # no '<' that is not escaped


@settings(max_examples=300, deadline=None)
@given(hs.text())
def test_plain_is_literal_for_any_text(text: str) -> None:
    md = plain(text)
    assert _unescaped_specials(md) == []
    assert "\n" not in md and "\r" not in md and "\u202e" not in md


@settings(max_examples=300, deadline=None)
@given(hs.text())
def test_html_text_is_literal_for_any_text(text: str) -> None:
    out = html_text(text)
    assert not set("<>\"'") & set(out) and html.unescape(out) == text


# ------------------------------------------------------------------------------ deck.gl tooltip
@pytest.mark.parametrize("mode", ["cells", "grid"])
def test_gene_map_tooltip_escapes_gene_unit_and_cell_type(mode: str) -> None:
    import numpy as np

    from ghist_core.pipeline.grid import build_grid_pyramid
    from ghist_core.viz import figures
    from prediction_factory import synthetic_prediction

    gene = f"ERBB2{IMG_HTML}"
    a = synthetic_prediction(n=400, genes=(gene, "ESR1"), seed=3)
    unit = "<img src=x onerror=f()>"  # short: long units are abbreviated on the map
    a.uns["ghist"]["expression_units"] = unit
    types = a.obs["cell_type"].astype(str).to_numpy().copy()
    types[::7] = f"T{IMG_HTML}"
    a.obs["cell_type"] = types
    grids = build_grid_pyramid(a, (50.0,)) if mode == "grid" else None
    gm = figures.gene_map(a, gene, mode=mode, grids=grids)
    spec = json.loads(gm.deck.to_json())
    tooltip = gm.deck._tooltip["html"]  # what st.pydeck_chart hands to deck.gl
    assert "<img" not in tooltip and html_text(gene) in tooltip and html_text(unit) in tooltip
    assert tooltip.startswith("<b>")  # the template's own markup is kept
    rows = spec["layers"][-1]["data"]
    shown = {r["t"] for r in rows}
    assert not any("<img" in t for t in shown)
    if mode == "cells":
        assert html_text(f"T{IMG_HTML}") in shown
    # the figure's own table keeps the real names (exports and colours are not escaped)
    assert f"T{IMG_HTML}" in set(np.asarray(gm.table["cell_type"]).astype(str)) or mode == "grid"


# ------------------------------------------------------------------------------ pages (AppTest)
def _texts(at: AppTest) -> list[str]:
    """Every markdown body on the page: markdown, captions, alerts, expander labels."""
    out = []
    for kind in ("markdown", "caption", "success", "info", "warning", "error"):
        out += [str(e.value) for e in at.get(kind)]
    out += [str(e.label) for e in at.get("expandable")]
    return out


def _assert_literal(at: AppTest, raw: str, *, must_show: bool = True) -> None:
    texts = _texts(at)
    assert not any(raw in t for t in texts), [t for t in texts if raw in t]
    if must_show:
        assert any(plain(raw) in t for t in texts), texts


def test_hostile_patient_id_and_file_name_render_as_text_on_upload(projects, svs_path, tmp_path) -> None:
    name = f"{IMG_MD} {IMG_HTML}.svs".replace("/", "")  # a file name cannot hold '/'
    pid = f"{IMG_MD}"
    at = open_page("pages/upload.py", {"project_dir": str(tmp_path / "p")})
    at.get("file_uploader")[0].upload(name, svs_path.read_bytes(), "application/octet-stream")
    at.run()
    assert not at.exception
    _assert_literal(at, name[:-4])  # the file's card shows its name as text
    [t for t in at.text_input if t.label == "Patient id"][0].set_value(pid)
    [cb for cb in at.checkbox if cb.label.startswith("Run the prediction")][0].set_value(False)
    [b for b in at.button if b.label == "Add to project"][0].click().run()
    assert not at.exception
    from ghist_core.project.store import Project

    assert Project.open_or_create(tmp_path / "p").list_slides()["patient_id"].tolist() == [pid]  # stored as typed
    _assert_literal(at, pid)
    assert any(plain(pid) in s.value for s in at.success)
    at.run()  # the page again: confirmation and the "not run yet" list both name the patient
    _assert_literal(at, pid)
    assert sum(plain(pid) in t for t in _texts(at)) >= 2


def test_hostile_clinical_cells_and_file_name_render_as_text_on_cohort(projects) -> None:
    at = open_page_alone("pages/cohort.py", timeout=60)
    rows = "".join(f"P{i:02d},{3 + i},{'Dead' if i % 3 else 'Alive'},{'G3' if i % 2 else 'G1'}\n" for i in range(30))
    data = ("patient_id,time,status,grade\n" + rows + f"{IMG_MD},{IMG_MD},Dead,G1\n").encode()
    fname = "cohort ![f](x.png).csv"
    at.radio(key="cohort_source").set_value("My clinical table")
    at.session_state["cohort_upload"] = (fname, data)
    at.run()
    assert not at.exception
    _assert_literal(at, IMG_MD)  # the left-out row's bad time value is reported as text
    _assert_literal(at, "![f](x.png)")  # so is the file name in the caption


def test_hostile_model_card_renders_as_text_on_models(projects, tmp_path, monkeypatch) -> None:
    import torch

    from ghist_core.weights.resolve import save_weights

    bundled = tmp_path / "weights"
    card = {"kind": f"ghist{IMG_MD}", "genes": [f"ERBB2{IMG_HTML}", IMG_MD], "cell_types": [f"T{IMG_MD}"],
            "description": f"A model {IMG_MD} {IMG_HTML}", "license": IMG_MD}
    save_weights({"w": torch.zeros(3)}, bundled, "hostile", card)
    (bundled / "broken.safetensors").write_bytes(b"x")
    (bundled / "broken.json").write_text("[1, 2")  # a malformed card next to it: named, the page still works
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(bundled))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    at = open_page("pages/models.py")
    _assert_literal(at, IMG_MD)
    _assert_literal(at, IMG_HTML)
    assert any("broken" in w.value and "not valid JSON" in w.value for w in at.warning)
    assert at.dataframe[0].value["name"].tolist() == ["broken", "hostile"]


@pytest.mark.parametrize("text", ["see http://127.0.0.1:9/p.png now", "HTTPS://host/x", "www.example.org",
                                  "mail jane.doe@example.org", "javascript:alert(7)"])
def test_plain_leaves_no_bare_link(text: str) -> None:
    """GFM turns bare URLs, www. names and e-mail addresses into links even when escaped: plain breaks them."""
    md = plain(text)
    assert _shown(md) == text
    bare = md.replace("\\", "")
    # no scheme directly followed by ':', no 'www.', no word character directly before '@'
    assert not re.search(r"(?i)(https?|ftps?|mailto|file|data|javascript):|www\.|\w@", bare), bare
