"""The order of a grouping variable's values: natural order for ordinal clinical codes.

Why one owner: the order of groups decides the Cox reference level, the order of the KM
legend and of every table, so the page, the risk groups and the survival models must agree.
Ordinal codes are ordered by what they mean, not alphabetically or by group size::

    natural_order(["Stage IIB", "Stage I", "Stage IIA", "Stage X", "Stage IV"])
    # ['Stage I', 'Stage IIA', 'Stage IIB', 'Stage IV', 'Stage X']
    describe_levels(table["stage_group"]).default_reference   # 'Stage I'

Recognised ordinal schemes (case-insensitive; all parsed values must share one scheme):

- ``stage``: AJCC/FIGO stages ``0 < I < IA < IB < IC < II < IIA < … < IV < IVB``, with or
  without the word "Stage" (sub-stages after their stage, ``Stage X`` = unknown, last);
- ``tnm``: ``T0 < Tis < T1 < T1a < … < T4d`` (likewise N and M; ``TX`` last);
- ``grade``: ``G1 < G2 < G3``, ``Grade 1 < Grade 2``, ``low < intermediate < high`` and
  ``well < moderately < poorly differentiated``;
- ``score``: IHC-style scores ``0 < 1+ < 2+ < 3+``;
- ``number``: plain numbers in numeric order (``2 < 10``).

Values a scheme does not parse (``Unknown``, ``[Not Available]``, ``Stage X``) go last, in
text order, provided at least two values parse. Anything else is ordered as text (nominal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import pandas as pd

__all__ = ["natural_order", "ordinal_scheme", "describe_levels", "Levels"]

_ROMAN = {"0": 0, "I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}
_STAGE = re.compile(r"^(?:(?:ajcc|figo|clinical|pathologic(?:al)?)\s+)*(?:stage\s*)?"
                    r"(IV|V|III|II|I|0)([A-D]?)(\d?)$", re.I)
_TNM = re.compile(r"^[yrpc]{0,2}([TNM])(IS|\d)([A-D]?)(\d?)(?:\s*\(.*\))?$", re.I)
_GRADE_NUM = re.compile(r"^(?:grade\s*|g\s*)(\d)$", re.I)
_SCORE = re.compile(r"^(\d)\s*\+$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_GRADE_WORDS = (
    (re.compile(r"^(well|w)[\s-]*(differentiated)?$|^low(\s*grade)?$", re.I), 1),
    (re.compile(r"^(moderately|moderate|m)[\s-]*(differentiated)?$|^intermediate(\s*grade)?$", re.I), 2),
    (re.compile(r"^(poorly|poor|p)[\s-]*(differentiated)?$|^high(\s*grade)?$", re.I), 3),
    (re.compile(r"^undifferentiated$", re.I), 4),
)


def _key(value: str) -> tuple[str, tuple] | None:
    """(scheme, sort key) of one value, or None when no scheme parses it."""
    v = " ".join(str(value).strip().split())
    if not v:
        return None
    m = _STAGE.match(v)
    if m and not (m.group(1) == "0" and "stage" not in v.lower()):  # a bare 0 is a number
        roman = m.group(1).upper()
        sub = m.group(2).upper()
        return "stage", (_ROMAN[roman], ord(sub) - 64 if sub else 0, int(m.group(3) or 0))
    m = _TNM.match(v)
    if m:
        num = m.group(2).upper()
        sub = m.group(3).upper()
        rank = 0.5 if num == "IS" else float(num)
        return f"tnm_{m.group(1).upper()}", (rank, ord(sub) - 64 if sub else 0, int(m.group(4) or 0))
    m = _GRADE_NUM.match(v)
    if m:
        return "grade", (int(m.group(1)),)
    for pattern, rank in _GRADE_WORDS:
        if pattern.match(v):
            return "grade", (rank,)
    m = _SCORE.match(v)
    if m:
        return "score", (int(m.group(1)),)
    if _NUMBER.match(v):
        return "number", (float(v),)
    return None


def _ordinal(values: list) -> tuple[str | None, list, list]:
    """(scheme, parsed values in order, the rest) — scheme None when not ordinal."""
    keys = {v: _key(v) for v in values}
    schemes = {k[0] for k in keys.values() if k is not None}
    # a plain "0" beside IHC scores ("0", "1+", "2+") is a score of 0
    if schemes == {"score", "number"} and all(
            keys[v][0] == "score" or keys[v][1] == (0.0,) for v in values if keys[v]):
        keys = {v: ("score", (int(float(k[1][0])),)) if k and k[0] == "number" else k
                for v, k in keys.items()}
        schemes = {"score"}
    parsed = [v for v in values if keys[v] is not None]
    if len(schemes) != 1 or len(parsed) < 2:
        return None, [], list(values)
    parsed.sort(key=lambda v: (keys[v][1], str(v)))
    return schemes.pop(), parsed, [v for v in values if keys[v] is None]


def _text_key(v: Any) -> tuple[str, str]:
    return (str(v).casefold(), str(v))


def natural_order(values: Iterable) -> list:
    """Distinct values (missing ones dropped) in natural order: ordinal codes by meaning,
    unparsed values after them, or all in text order when the values are not ordinal."""
    vals = list(dict.fromkeys(v for v in values if not _missing(v)))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return sorted(vals)
    scheme, parsed, rest = _ordinal([str(v) for v in vals])
    back = {str(v): v for v in vals}
    if scheme is None:
        return sorted(vals, key=_text_key)
    return [back[v] for v in parsed] + sorted((back[v] for v in rest), key=_text_key)


def ordinal_scheme(values: Iterable) -> str | None:
    """Which ordinal scheme the values follow (``"stage"``, ``"tnm_T"``, ``"grade"``,
    ``"score"``, ``"number"``), or None when they are nominal."""
    vals = list(dict.fromkeys(str(v) for v in values if not _missing(v)))
    return _ordinal(vals)[0]


def _missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Levels:
    """The values of a grouping variable as the page offers them.

    Attributes
    ----------
    levels : values in natural order (see :func:`natural_order`).
    counts : patients per value.
    scheme : the ordinal scheme, or None for a nominal variable.
    default_reference : the lowest level of an ordinal variable (e.g. ``Stage I``), the
        largest group of a nominal one (ties: the first in order).
    """

    levels: list
    counts: dict
    scheme: str | None
    default_reference: Any

    @property
    def ordinal(self) -> bool:
        return self.scheme is not None

    def reference_rule(self) -> str:
        """In words, why :attr:`default_reference` is the default."""
        return ("the lowest level (ordered variable)" if self.ordinal
                else "the largest group")


def describe_levels(values: pd.Series | Iterable, *, among: Iterable | None = None) -> Levels:
    """Levels of ``values`` in natural order, their counts and the default reference.

    ``among`` restricts the choice of the default reference (e.g. to the groups the user
    kept); the levels and counts still cover every value.
    """
    s = pd.Series(list(values) if not isinstance(values, pd.Series) else values).dropna()
    counts = s.value_counts()
    levels = natural_order(counts.index)
    scheme = ordinal_scheme(levels)
    cand = [lv for lv in levels if among is None or lv in set(among)] or levels
    if not cand:
        ref = None
    elif scheme is not None:
        ref = cand[0]
    else:
        ref = max(cand, key=lambda lv: (int(counts[lv]), -cand.index(lv)))
    return Levels(levels=levels, counts={lv: int(counts[lv]) for lv in levels}, scheme=scheme,
                  default_reference=ref)
