"""Report text: section extraction (MIMIC-CXR free text, OpenI sections) and normalisation.

Normalisation: whitespace inside a section collapses to single spaces (MIMIC wraps lines at ~80
columns); sections are written one per line as "NAME: text". De-identified spans - MIMIC's `___` and
OpenI's `XXXX` - are either kept as they are (`deid="keep"`, default) or each run of them (e.g.
"XXXX XXXX XXXX") is replaced by one token (`deid="token"`, DEID_TOKEN by default).
Nothing here logs report text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

DEID_MODES = ("keep", "token")
DEID_TOKEN = "[DEID]"
DEFAULT_SECTIONS = ("FINDINGS", "IMPRESSION")
EMPTY_POLICIES = ("skip", "keep")
PREAMBLE = "PREAMBLE"  # text before the first header
# One de-identified span: MIMIC `___` (3+ underscores) or OpenI `XXXX` (4+ X), possibly glued to
# punctuation or a suffix such as XXXX-year-old; a run is spans separated only by spaces/commas/periods.
_SPAN = r"(?:_{3,}|\bX{4,})"
_DEID_RUN = re.compile(_SPAN + r"(?:[ \t]*[,.]?[ \t]*" + _SPAN + r")*")
# A header: upper-case words at the start of a line followed by ':' (MIMIC), or the bare FINAL REPORT line.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 /&()\-]{1,40}?)[ \t]*:", re.MULTILINE)
_FINAL_REPORT = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)
ALIASES = {"IMPRESSIONS": "IMPRESSION", "FINDING": "FINDINGS", "CONCLUSION": "IMPRESSION",
           "CONCLUSIONS": "IMPRESSION", "INDICATIONS": "INDICATION", "COMPARISONS": "COMPARISON",
           "FINDINGS AND IMPRESSION": "FINDINGS", "CLINICAL HISTORY": "HISTORY"}


def replace_deid(text: str, mode: str = "keep", token: str = DEID_TOKEN) -> str:
    if mode == "keep":
        return text
    if mode != "token":
        raise ValueError(f"unknown de-identification mode {mode!r} (expected one of {', '.join(DEID_MODES)})")
    return _DEID_RUN.sub(token, text)


def collapse(text: str) -> str:
    """All whitespace runs -> one space, stripped."""
    return " ".join(text.split())


def normalise_text(text: str, deid: str = "keep", token: str = DEID_TOKEN) -> str:
    """Whitespace-normalise one block of free text, keeping paragraph breaks as single newlines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    paras = [collapse(p) for p in re.split(r"\n[ \t]*\n", text)]
    return replace_deid("\n".join(p for p in paras if p), deid, token)


def canonical_header(name: str) -> str:
    name = collapse(name).upper()
    return ALIASES.get(name, name)


def split_sections(text: str) -> dict[str, str]:
    """MIMIC-style free text -> {HEADER: raw text} in order of appearance; repeated headers are joined.
    Text before the first header goes under PREAMBLE; the `FINAL REPORT` banner is dropped."""
    text = _FINAL_REPORT.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    starts = [(m.start(), m.end(), canonical_header(m.group(1))) for m in matches]
    head = text[: starts[0][0]] if starts else text
    if head.strip():
        sections[PREAMBLE] = head.strip()
    for i, (_, end, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        body = text[end:stop].strip()
        sections[name] = f"{sections[name]}\n{body}".strip() if name in sections else body
    return sections


def compose(sections: Mapping[str, str], wanted: Sequence[str] = DEFAULT_SECTIONS, *, fallback: bool = True,
            deid: str = "keep", token: str = DEID_TOKEN) -> tuple[str, list[str]]:
    """Join the `wanted` sections that have text, as "NAME: text" lines, in the order of `wanted`.
    When none has text and `fallback`, use the whole body (every section, in report order).
    Returns (text, names used); ("", []) means an empty report."""
    wanted = [canonical_header(w) for w in wanted]
    norm = {canonical_header(k): collapse(v) for k, v in sections.items()}
    used = [w for w in wanted if norm.get(w)]
    if not used and fallback:
        used = [k for k, v in norm.items() if v]
    lines = [norm[k] if k == PREAMBLE else f"{k}: {norm[k]}" for k in used]
    return replace_deid("\n".join(lines), deid, token), used


def report_text(raw: str, wanted: Sequence[str] = DEFAULT_SECTIONS, *, fallback: bool = True,
                deid: str = "keep", token: str = DEID_TOKEN) -> tuple[str, list[str]]:
    """MIMIC-CXR report file contents -> (normalised text of the chosen sections, section names used)."""
    return compose(split_sections(raw), wanted, fallback=fallback, deid=deid, token=token)


def parse_sections_arg(value: Optional[str | Iterable[str]]) -> tuple[str, ...]:
    """'FINDINGS,IMPRESSION' (CLI) or a sequence -> canonical upper-case names; error on an empty list."""
    if value is None:
        return DEFAULT_SECTIONS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(canonical_header(v) for v in items if v.strip())
    if not names:
        raise ValueError("--sections: expected comma-separated section names such as FINDINGS,IMPRESSION, "
                         f"got {value!r}")
    return names
