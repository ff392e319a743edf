"""Data text (patient ids, file names, gene names, card fields) made safe for markdown and HTML.

Streamlit renders ``st.markdown``/``st.caption``/``st.success``/widget labels as markdown, and
deck.gl puts tooltips into ``innerHTML``: a patient id ``![x](http://host/p.png)`` would make every
viewer's browser fetch that URL, and a gene called ``<img src=x onerror=...>`` would run a script.
Every string that comes from data, uploads or model cards goes through one of these two functions
before it reaches markdown or HTML; the page's own wording does not.
"""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["plain", "html_text"]

# Every ASCII punctuation character may be backslash-escaped in CommonMark, which makes it literal:
# no links, images, emphasis, headings, lists, tables, raw HTML, LaTeX ($), or Streamlit's
# :colour[...] / :material/icon: directives.
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")
# GitHub-flavoured markdown also turns bare URLs, ``www.`` names and e-mail addresses into links,
# escapes or not; an invisible WORD JOINER (U+2060) inside each breaks that and nothing else.
_AUTOLINK = re.compile(r"(?i)(https?|ftps?|mailto|file|data|javascript)(?=\\:)|(www)(?=\\\.)|(?=\\@)")
WORD_JOINER = "\u2060"


def plain(value: Any) -> str:
    """``value`` as literal text inside markdown: every markdown/HTML character is escaped.

    Newlines become spaces (a line break could start a new block) and control and
    bidirectional-override characters are dropped; bare URLs, ``www.`` names and e-mail
    addresses get an invisible word joiner so that they are not turned into links.
    """
    text = _CONTROL.sub("", str(value)).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return _AUTOLINK.sub(lambda m: m.group(0) + WORD_JOINER, escaped)


def html_text(value: Any) -> str:
    """``value`` as literal text inside HTML (tooltips, ``unsafe_allow_html`` blocks): ``<>&"'`` escaped."""
    return html.escape(str(value), quote=True)
