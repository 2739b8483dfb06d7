"""A rule-based report labeller: CheXpert-style labels (1 positive, 0 negative, -1 uncertain, None not mentioned)
read off a report's text with medspaCy (spaCy's sentencizer, a TargetMatcher of synonyms per label, ConText for
negation and uncertainty).

Each label has target phrases (SYNONYMS; a word may list alternatives, e.g. `effusion|effusions`). A mention is
uncertain when a hedge modifies it, else negated when a negation does, else positive; a report's label is positive
if any mention is, else uncertain if any is, else negative if any is, else not mentioned (CheXpert's aggregation).
No Finding is 1 when no pathology (every label but No Finding and Support Devices) is positive or uncertain, and
not mentioned otherwise. Only the FINDINGS and IMPRESSION sections are read when the report has them (an indication
such as "evaluate for pneumonia" is not a finding); otherwise the whole text.

ConText's packaged rules are used with these changes (MODIFIERS, DROPPED): hedges that its rules read as negations
("cannot exclude", "cannot be excluded", "is not excluded") are uncertain, "questionable", "may (be)" on either
side, "borderline", "suspected" and "cannot rule out" are hedges, "concerning for" reads as positive (how a
radiologist states a likely finding), and "normal" / "within normal limits" / "unremarkable" negate the size-and-
contour labels (Cardiomegaly, Enlarged Cardiomediastinum) only, as does "is not enlarged" before it: "The heart size
is normal" is a negative cardiomegaly mention, and "normal" does not reach an opacity in the same sentence.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from vkd_dist.data.reports import report_text
from vkd_dist.labels import LABELS

NO_FINDING = "No Finding"
NOT_PATHOLOGY = (NO_FINDING, "Support Devices")

# Target phrases per label, lower case; each space-separated word is a token, `a|b` either. A longer match wins over a
# shorter one it overlaps ("nodular opacity" is a lesion, not an opacity).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        "cardiomediastinal silhouette|contour|contours", "mediastinal silhouette|contour|contours|widening",
        "mediastinum", "widened mediastinum", "widening of the mediastinum", "enlarged cardiomediastinum"),
    "Cardiomegaly": (
        "cardiomegaly", "heart", "heart size", "cardiac silhouette|enlargement|size", "enlarged heart",
        "enlargement of the cardiac silhouette", "heart is enlarged"),
    "Lung Opacity": (
        "opacity|opacities", "airspace disease|opacity|opacities", "infiltrate|infiltrates", "density|densities",
        "opacification"),
    "Lung Lesion": (
        "nodule|nodules", "mass|masses", "nodular opacity|opacities|density|densities", "lung lesion|lesions",
        "pulmonary mass|lesion", "neoplasm", "masslike opacity|opacities", "nodular prominence",
        "lung cancer|carcinoma", "malignancy"),
    "Edema": ("edema", "pulmonary edema", "interstitial edema", "vascular congestion", "pulmonary vascular congestion",
              "fluid overload"),
    "Consolidation": ("consolidation|consolidations", "consolidative opacity|opacities|change"),
    "Pneumonia": ("pneumonia|pneumonias", "infection", "infectious process", "bronchopneumonia"),
    "Atelectasis": ("atelectasis", "atelectatic", "atelectatic change|changes", "collapse", "volume loss"),
    "Pneumothorax": ("pneumothorax|pneumothoraces",),
    "Pleural Effusion": (
        "pleural effusion|effusions", "effusion|effusions", "pleural fluid",
        "blunting of the costophrenic angle|angles", "blunting of the right|left costophrenic angle|angles",
        "blunted costophrenic angle|angles", "hydrothorax"),
    "Pleural Other": ("pleural thickening|scarring|abnormality|abnormalities|plaque|plaques", "fibrothorax"),
    "Fracture": ("fracture|fractures", "fx"),
    "Support Devices": (
        "support device|devices", "line|lines", "tube|tubes", "catheter|catheters", "pacemaker", "endotracheal tube",
        "picc", "central venous catheter", "pacer", "defibrillator", "stent|stents", "sternotomy wires",
        "enteric tube", "nasogastric tube", "chest tube", "leads", "stimulator", "ivc filter", "port"),
}
SIZE_AND_CONTOUR = ("Cardiomegaly", "Enlarged Cardiomediastinum")

# (literal, category, direction, pattern, allowed target labels or None for all)
Pattern = list[dict[str, Any]]
MODIFIERS: tuple[tuple[str, str, str, Optional[Pattern], Optional[tuple[str, ...]]], ...] = (
    ("cannot exclude", "POSSIBLE_EXISTENCE", "FORWARD",
     [{"LOWER": {"IN": ["cannot", "can", "could"]}}, {"LOWER": {"IN": ["not", "n't"]}, "OP": "?"},
      {"LOWER": {"IN": ["exclude", "rule"]}}, {"LOWER": "out", "OP": "?"}], None),
    ("cannot be excluded", "POSSIBLE_EXISTENCE", "BACKWARD",
     [{"LOWER": {"IN": ["cannot", "can", "could", "is", "are", "was"]}}, {"LOWER": {"IN": ["not", "n't"]}, "OP": "?"},
      {"LOWER": "be", "OP": "?"}, {"LOWER": {"IN": ["excluded", "ruled"]}}, {"LOWER": "out", "OP": "?"}], None),
    ("questionable", "POSSIBLE_EXISTENCE", "FORWARD",
     [{"LOWER": {"IN": ["questionable", "question", "suspected", "suspect", "possibly",
                        "presumed", "perhaps"]}}], None),
    ("may", "POSSIBLE_EXISTENCE", "BIDIRECTIONAL",
     [{"LOWER": {"IN": ["may", "might", "could"]}}, {"LOWER": "be", "OP": "?"}], None),
    ("may represent", "POSSIBLE_EXISTENCE", "FORWARD",
     [{"LOWER": {"IN": ["may", "might", "could"]}}, {"LOWER": {"IN": ["represent", "reflect", "indicate"]}}], None),
    ("borderline", "POSSIBLE_EXISTENCE", "BIDIRECTIONAL", [{"LOWER": {"IN": ["borderline", "equivocal"]}}], None),
    ("normal", "NEGATED_EXISTENCE", "BIDIRECTIONAL",
     [{"LOWER": {"IN": ["normal", "unremarkable", "normal-sized"]}}], SIZE_AND_CONTOUR),
    ("not enlarged", "NEGATED_EXISTENCE", "BACKWARD",
     [{"LOWER": {"IN": ["is", "are", "was"]}, "OP": "?"}, {"LOWER": {"IN": ["not", "n't"]}},
      {"LOWER": {"IN": ["enlarged", "widened", "dilated"]}}], SIZE_AND_CONTOUR),
    ("within normal limits", "NEGATED_EXISTENCE", "BIDIRECTIONAL",
     [{"LOWER": "within"}, {"LOWER": "normal"}, {"LOWER": "limits"}], SIZE_AND_CONTOUR),
)
# "concerning for X": a positive statement; "might be" (forward only): replaced by "may" (either side)
DROPPED = {"concerned about", "might be"}


def _token_pattern(phrase: str) -> Pattern:
    return [{"LOWER": {"IN": word.split("|")}} if "|" in word else {"LOWER": word} for word in phrase.split(" ")]


@functools.cache
def _pipeline(names: tuple[str, ...]):
    try:
        import medspacy
        from medspacy.context import ConText, ConTextRule
        from medspacy.target_matcher import TargetRule
    except ImportError as exc:
        raise ImportError("the report labeller needs medspaCy: pip install 'vkd_dist[labeller]' "
                          "(scripts/setup.sh installs it)") from exc
    # spaCy's punctuation sentencizer, not medspaCy's PyRuSH: as good on reports' full stops, 10x faster, and PyRuSH
    # logs every sentence at DEBUG level (reports are patient data)
    nlp = medspacy.load(medspacy_enable=["medspacy_target_matcher"])
    nlp.add_pipe("sentencizer", first=True)
    matcher = nlp.get_pipe("medspacy_target_matcher")
    matcher.add([TargetRule(phrase, label, pattern=_token_pattern(phrase))
                 for label in names for phrase in SYNONYMS[label]])
    context: ConText = nlp.add_pipe("medspacy_context")
    kept = [r for r in context.rules if r.literal not in DROPPED]
    context = nlp.replace_pipe("medspacy_context", "medspacy_context", config={"rules": None})
    context.add(kept)
    context.add([ConTextRule(literal, category, direction=direction, pattern=pattern,
                             allowed_types=set(allowed) if allowed else None)
                 for literal, category, direction, pattern, allowed in MODIFIERS])
    return nlp


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """The data set's labels, all known to the labeller (No Finding is derived, the others have synonyms)."""
    unknown = [n for n in names if n != NO_FINDING and n not in SYNONYMS]
    if unknown:
        raise ValueError(f"the report labeller has no synonyms for label {unknown[0]!r}; it reads the CheXpert labels "
                         f"({', '.join(LABELS)}), add target phrases in vkd_dist/data/labeller.py SYNONYMS")
    return tuple(names)


def findings_text(report: str) -> str:
    """FINDINGS and IMPRESSION when the report has them, else the whole text."""
    text, _ = report_text(report)
    return re.sub(r"^(FINDINGS|IMPRESSION): ", "", text, flags=re.MULTILINE)


def mention_value(ent) -> int:
    return -1 if ent._.is_uncertain else 0 if ent._.is_negated else 1


def aggregate(values: Iterable[int]) -> Optional[int]:
    """Positive over uncertain over negative; None when there is no mention."""
    seen = set(values)
    return next((v for v in (1, -1, 0) if v in seen), None)


class ReportLabeller:
    """Reads `names` (default: the 14 CheXpert labels) off reports. Build once: loading the pipeline takes seconds."""

    def __init__(self, names: Sequence[str] = LABELS):
        self.names = check_names(names)
        self.findings = tuple(n for n in self.names if n != NO_FINDING)
        self.nlp = _pipeline(self.findings)

    def read(self, report: str) -> dict[str, Optional[int]]:
        return self.read_many([report])[0]

    def read_many(self, reports: Iterable[str], batch_size: int = 64) -> list[dict[str, Optional[int]]]:
        docs = self.nlp.pipe((findings_text(r) for r in reports), batch_size=batch_size)
        return [self._labels(doc) for doc in docs]

    def _labels(self, doc) -> dict[str, Optional[int]]:
        mentions: dict[str, list[int]] = {n: [] for n in self.findings}
        for ent in doc.ents:
            mentions[ent.label_].append(mention_value(ent))
        labels = {n: aggregate(mentions[n]) for n in self.findings}
        if NO_FINDING in self.names:
            pathology = any(labels[n] in (1, -1) for n in self.findings if n not in NOT_PATHOLOGY)
            labels[NO_FINDING] = None if pathology else 1
        return {n: labels[n] for n in self.names}
