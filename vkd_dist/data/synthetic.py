"""The embedded default data set: procedurally rendered chest-radiograph-like images with paired reports.

Each case draws a set of findings with attributes (side, zone, size/severity). The image renders each
present finding with a visibility that grows with its severity and the `lesion_contrast` knob; the
report describes it. Labels come from what the report says, as MIMIC-CXR's come from its reports:
1 for a described finding, 0 for a negated one, -1 for a hedged one, null for one never mentioned.
`label_noise` makes the image disagree with the report for a fraction of findings, so that the image
alone is noisy while the report makes the labels nearly certain - the regime VKD is meant for.
Everything is drawn from numpy generators seeded by (seed, split, index): same arguments, same bytes.

`label_fraction` F < 1 builds the regime users live in, reports for every study and labels for few: in the
training split a seeded random 1 - F of the studies keep their image and report but lose every label (written as
unlabelled studies, see vkd_dist/data/schema.py). Which studies keep labels is one permutation seeded by
`label_seed` (default: `seed`), so a smaller F's labelled studies are a subset of a larger F's, another
`label_seed` draws another subset of the same studies, and the images and reports are those of the fully labelled
corpus. Validation and test are unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFilter

from vkd_dist.data.schema import SPLITS, Record
from vkd_dist.data.shards import finish_dataset, write_split
from vkd_dist.labels import LABELS

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
FINDINGS = LABELS[1:]  # "No Finding" is derived, never drawn


@dataclass(frozen=True)
class SyntheticParams:
    image_size: int = 256
    seed: int = 0
    lesion_contrast: float = 1.0  # multiplies every finding's image contrast
    noise: float = 1.0  # multiplies quantum noise and anatomical texture
    label_noise: float = 0.05  # chance a reported finding is not visible (and 1/5 of it: an unreported one is)
    prevalence_scale: float = 1.0  # multiplies every finding's base rate
    fmt: str = "jpg"


# Base rates, roughly MIMIC-CXR-like but with rare labels raised so every label has test positives.
BASE_RATE = {
    "Enlarged Cardiomediastinum": 0.08, "Cardiomegaly": 0.18, "Lung Opacity": 0.22, "Lung Lesion": 0.07,
    "Edema": 0.12, "Consolidation": 0.08, "Pneumonia": 0.1, "Atelectasis": 0.18, "Pneumothorax": 0.07,
    "Pleural Effusion": 0.2, "Pleural Other": 0.05, "Fracture": 0.06, "Support Devices": 0.2,
}
SIDES = ("right", "left")
ZONES = ("upper", "mid", "lower")
SIZES = ("small", "moderate", "large")
SEVERITIES = ("mild", "moderate", "severe")

# Phrase banks. {side} {zone} {size} {sev} are filled from the finding's attributes.
POSITIVE = {
    "Enlarged Cardiomediastinum": ["The cardiomediastinal silhouette is {sev}ly widened.",
                                   "{Sev} widening of the mediastinum.",
                                   "The mediastinal contour is enlarged, {sev} in degree."],
    "Cardiomegaly": ["The heart is {sev}ly enlarged.", "{Sev} cardiomegaly.",
                     "There is {sev} enlargement of the cardiac silhouette."],
    "Lung Opacity": ["There is a {sev} hazy opacity in the {side} {zone} zone.",
                     "{Sev} airspace opacity is seen in the {side} {zone} lung.",
                     "Ill-defined {side} {zone} zone opacity, {sev}."],
    "Lung Lesion": ["A {size} nodule is seen in the {side} {zone} lung.",
                    "There is a {size} rounded mass in the {side} {zone} zone.",
                    "{Size} pulmonary nodular density in the {side} {zone} lobe region."],
    "Edema": ["There is {sev} pulmonary edema.", "{Sev} interstitial edema with perihilar haziness.",
              "Findings are consistent with {sev} pulmonary vascular congestion and edema."],
    "Consolidation": ["There is {sev} consolidation in the {side} {zone} lobe.",
                      "Dense {side} {zone} zone consolidation with air bronchograms, {sev}.",
                      "{Sev} focal consolidation at the {side} {zone} lung."],
    "Pneumonia": ["Patchy {side} {zone} opacities are concerning for pneumonia, {sev}.",
                  "Findings compatible with {sev} {side} {zone} lobe pneumonia.",
                  "{Sev} {side} {zone} infection/pneumonia."],
    "Atelectasis": ["Plate-like atelectasis at the {side} base, {sev}.", "{Sev} {side} basilar atelectasis.",
                    "There is {sev} subsegmental atelectasis of the {side} lower lobe."],
    "Pneumothorax": ["There is a {size} {side} pneumothorax.", "{Size} {side} apical pneumothorax is present.",
                     "A {size} {side}-sided pneumothorax is seen."],
    "Pleural Effusion": ["There is a {size} {side} pleural effusion.",
                         "{Size} {side} effusion with blunting of the costophrenic angle.",
                         "A {size} {side}-sided pleural effusion is present."],
    "Pleural Other": ["{Sev} {side} pleural thickening.", "There is {sev} {side} pleural scarring.",
                      "{Side} apical pleural thickening, {sev}."],
    "Fracture": ["There is a {sev} {side} rib fracture.", "{Sev} displaced fracture of a {side} {zone} rib.",
                 "A {side} rib fracture is noted, {sev}."],
    "Support Devices": ["An endotracheal tube terminates above the carina.",
                        "A right-sided central venous catheter is in place.",
                        "A left chest wall pacemaker with leads in place."],
}
NEGATION = {
    "Enlarged Cardiomediastinum": ["The mediastinal contours are normal.", "No mediastinal widening."],
    "Cardiomegaly": ["The heart size is normal.", "No cardiomegaly."],
    "Lung Opacity": ["No focal opacity.", "The lungs are clear without airspace opacity."],
    "Lung Lesion": ["No pulmonary nodule or mass.", "No suspicious nodules."],
    "Edema": ["No pulmonary edema.", "No signs of vascular congestion or edema."],
    "Consolidation": ["No focal consolidation.", "There is no consolidation."],
    "Pneumonia": ["No evidence of pneumonia.", "No findings to suggest pneumonia."],
    "Atelectasis": ["No atelectasis.", "No evidence of collapse or atelectasis."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "The costophrenic angles are sharp without effusion."],
    "Pleural Other": ["No pleural thickening.", "No pleural abnormality."],
    "Fracture": ["No acute fracture.", "No displaced rib fractures."],
    "Support Devices": ["No lines or tubes.", "No support devices are seen."],
}
UNCERTAIN = {
    "Enlarged Cardiomediastinum": ["Possible mild mediastinal widening.", "The mediastinum may be slightly widened."],
    "Cardiomegaly": ["The heart size is borderline enlarged.", "Possible mild cardiomegaly."],
    "Lung Opacity": ["Questionable faint opacity in the {side} {zone} zone.", "Possible {side} {zone} opacity."],
    "Lung Lesion": ["A possible {side} {zone} nodule cannot be excluded.", "Questionable {side} nodular opacity."],
    "Edema": ["Possible mild edema.", "Mild edema cannot be excluded."],
    "Consolidation": ["Cannot exclude early {side} {zone} consolidation.", "Possible {side} consolidation."],
    "Pneumonia": ["Cannot exclude early pneumonia in the {side} {zone} lobe.", "Possible early {side} pneumonia."],
    "Atelectasis": ["Possible {side} basilar atelectasis.", "Atelectasis is not excluded at the {side} base."],
    "Pneumothorax": ["A tiny {side} apical pneumothorax cannot be excluded.", "Questionable {side} pneumothorax."],
    "Pleural Effusion": ["Possible small {side} effusion.", "A trace {side} pleural effusion is not excluded."],
    "Pleural Other": ["Possible {side} pleural thickening.", "Questionable {side} pleural scarring."],
    "Fracture": ["Possible {side} rib fracture.", "A subtle {side} rib fracture cannot be excluded."],
    "Support Devices": ["Possible overlying line.", "A tube may project over the chest."],
}
FILLER = ["Lung volumes are normal.", "Lung volumes are low.", "The visualized upper abdomen is unremarkable.",
          "Degenerative changes of the thoracic spine.", "Surgical clips project over the upper abdomen.",
          "Overlying soft tissues are unremarkable."]
INDICATIONS = ["cough", "fever", "shortness of breath", "chest pain", "hypoxia", "evaluate for pneumonia",
               "pre-operative assessment", "line placement"]
NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                     "Normal chest radiograph."]
DRAWN_WITH_ANATOMY = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Pneumothorax", "Fracture")
# CheXpert-style hierarchy: a child finding usually shows as lung opacity too.
PARENT = {"Edema": "Lung Opacity", "Consolidation": "Lung Opacity", "Pneumonia": "Lung Opacity",
          "Atelectasis": "Lung Opacity", "Lung Lesion": "Lung Opacity", "Cardiomegaly": "Enlarged Cardiomediastinum"}


@dataclass
class Finding:
    name: str
    visible: bool
    severity: float  # 0..1
    side: str
    zone: str
    device: int = 0


def fill_template(template: str, f: Finding) -> str:
    size = SIZES[min(2, int(f.severity * 3))]
    sev = SEVERITIES[min(2, int(f.severity * 3))]
    out = template.format(side=f.side, zone=f.zone, size=size, sev=sev, Side=f.side.capitalize(),
                          Size=size.capitalize(), Sev=sev.capitalize())
    return out.replace("severely", "markedly")


def draw_findings(rng: np.random.Generator, p: SyntheticParams) -> dict[str, Finding]:
    """The findings a study has, with their attributes (and the hierarchy's co-occurrences)."""
    present: dict[str, Finding] = {}
    for name in FINDINGS:
        rate = min(0.9, BASE_RATE[name] * p.prevalence_scale)
        if rng.random() < rate:
            present[name] = Finding(name, True, float(rng.uniform(0.0, 1.0)), SIDES[rng.integers(2)],
                                    ZONES[rng.integers(3)], int(rng.integers(3)))
    if "Pneumonia" in present and "Consolidation" not in present and rng.random() < 0.4:
        f = present["Pneumonia"]
        present["Consolidation"] = Finding("Consolidation", True, f.severity, f.side, f.zone)
    if "Edema" in present and "Cardiomegaly" not in present and rng.random() < 0.4:
        present["Cardiomegaly"] = Finding("Cardiomegaly", True, float(rng.uniform(0.2, 1)), "right", "mid")
    return present


def sample_case(rng: np.random.Generator, p: SyntheticParams):
    """Draw findings and the report statuses. Returns (labels dict, findings to render, sentences)."""
    present = draw_findings(rng, p)
    labels: dict[str, Optional[int]] = {name: None for name in LABELS}
    findings_text: list[str] = []
    for name in FINDINGS:
        if name in present:
            f = present[name]
            hedged = rng.random() < 0.12
            if hedged:  # hedged findings are faint in the image too
                f.severity = f.severity * 0.3
                labels[name] = -1
                findings_text.append(fill_template(UNCERTAIN[name][rng.integers(len(UNCERTAIN[name]))], f))
            else:
                labels[name] = 1
                bank = POSITIVE[name]
                idx = f.device if name == "Support Devices" else rng.integers(len(bank))
                findings_text.append(fill_template(bank[idx], f))
            if rng.random() < p.label_noise:
                f.visible = False
        else:
            r = rng.random()
            if r < 0.45:
                labels[name] = 0
                findings_text.append(NEGATION[name][rng.integers(len(NEGATION[name]))])
            elif r < 0.47:
                f = Finding(name, False, 0.1, SIDES[rng.integers(2)], ZONES[rng.integers(3)])
                labels[name] = -1
                findings_text.append(fill_template(UNCERTAIN[name][rng.integers(len(UNCERTAIN[name]))], f))
            elif rng.random() < p.label_noise * 0.2:  # unreported but visible
                present[name] = Finding(name, True, float(rng.uniform(0.3, 1)), SIDES[rng.integers(2)],
                                        ZONES[rng.integers(3)], int(rng.integers(3)))
    pathologic = [n for n in FINDINGS if n != "Support Devices" and labels[n] in (1, -1)]
    if not pathologic:
        labels["No Finding"] = 1
    return labels, [f for f in present.values() if f.visible], findings_text, pathologic


def render_report(rng: np.random.Generator, labels: dict, findings_text: list[str], pathologic: list[str],
                  view: str, stated: Optional[list[str]] = None) -> str:
    """The report around `findings_text`; its impression repeats `stated` (default: the sentences that are not
    negations)."""
    order = rng.permutation(len(findings_text))
    body = [findings_text[i] for i in order]
    if rng.random() < 0.5:
        body.insert(int(rng.integers(len(body) + 1)), FILLER[rng.integers(len(FILLER))])
    positives = stated if stated is not None else [s for s in findings_text
                                                   if not any(s in NEGATION[n] for n in NEGATION)]
    if labels["No Finding"] == 1:
        impression = NORMAL_IMPRESSION[rng.integers(len(NORMAL_IMPRESSION))]
        if positives:  # support devices only
            impression = " ".join([*positives[:1], impression])
    else:
        impression = " ".join(positives[: 1 + int(rng.integers(3))]) or "See findings."
    view_text = "PA and lateral views of the chest" if view == "PA" else "Portable AP view of the chest"
    comparison = "None." if rng.random() < 0.4 else "Prior study from ___."
    sex = ("man", "woman")[rng.integers(2)]
    indication = INDICATIONS[rng.integers(len(INDICATIONS))]
    parts = [f"EXAMINATION: {view_text}.",
             f"INDICATION: ___-year-old {sex} with {indication}.",
             f"COMPARISON: {comparison}", "", "FINDINGS:", " ".join(body), "", "IMPRESSION:", impression]
    if rng.random() < 0.15:
        parts.append("Findings were discussed with Dr. ___ at ___ by telephone.")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ image
class Canvas:
    """Normalised coordinates (x right, y down, in [0, 1]) with the patient's positioning applied."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
        angle = np.deg2rad(rng.uniform(-4, 4))
        scale = rng.uniform(0.92, 1.06)
        dx, dy = rng.uniform(-0.04, 0.04, size=2)
        cx, cy = xs - 0.5 - dx, ys - 0.5 - dy
        self.x = (np.cos(angle) * cx + np.sin(angle) * cy) / scale + 0.5
        self.y = (-np.sin(angle) * cx + np.cos(angle) * cy) / scale + 0.5
        self.img = np.full((size, size), 0.04, np.float32)

    def ellipse(self, cx, cy, rx, ry, soft=0.02):
        d = np.sqrt(((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2)
        return np.clip((1.0 - d) / soft, 0.0, 1.0)

    def gauss(self, cx, cy, sx, sy):
        return np.exp(-0.5 * (((self.x - cx) / sx) ** 2 + ((self.y - cy) / sy) ** 2))

    def curve_band(self, fx, width):
        """A band of `width` around the curve y = fx(x)."""
        return np.clip(1.0 - np.abs(self.y - fx(self.x)) / width, 0.0, 1.0)

    def segment(self, x0, y0, x1, y1, width):
        px, py = self.x - x0, self.y - y0
        vx, vy = x1 - x0, y1 - y0
        t = np.clip((px * vx + py * vy) / (vx * vx + vy * vy), 0, 1)
        d = np.sqrt((px - t * vx) ** 2 + (py - t * vy) ** 2)
        return np.clip(1.0 - d / width, 0.0, 1.0)


def _texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    small = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    lo, hi = small.min(), small.max()
    img = Image.fromarray(((small - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def render_image(rng: np.random.Generator, findings: list[Finding], p: SyntheticParams) -> np.ndarray:
    c = Canvas(p.image_size, rng)
    s = p.image_size
    k = p.lesion_contrast
    by = {f.name: f for f in findings}

    def vis(f: Finding) -> float:  # contrast grows with severity; mild findings stay subtle
        return k * (0.35 + 0.65 * f.severity)

    thorax = c.ellipse(0.5, 0.56, 0.44, 0.52, soft=0.05)
    c.img += 0.38 * thorax
    heart_scale = 1.0 + rng.normal(0, 0.04)
    if "Cardiomegaly" in by:
        heart_scale += 0.12 + 0.3 * vis(by["Cardiomegaly"])
    med_scale = 1.0 + rng.normal(0, 0.05)
    if "Enlarged Cardiomediastinum" in by:
        med_scale += 0.3 + 0.6 * vis(by["Enlarged Cardiomediastinum"])
    # Diaphragm domes (image left = patient right, which sits higher).
    dome_r = 0.74 + rng.normal(0, 0.015)
    dome_l = 0.77 + rng.normal(0, 0.015)
    if "Atelectasis" in by:  # volume loss lifts the hemidiaphragm
        lift = 0.02 + 0.05 * vis(by["Atelectasis"])
        dome_r, dome_l = (dome_r - lift, dome_l) if by["Atelectasis"].side == "right" else (dome_r, dome_l - lift)
    below_r = c.y > dome_r - 0.06 * (1 - ((c.x - 0.32) / 0.18) ** 2)
    below_l = c.y > dome_l - 0.06 * (1 - ((c.x - 0.68) / 0.18) ** 2)
    lung_r = c.ellipse(0.31, 0.47, 0.16, 0.33, soft=0.08) * ~below_r
    lung_l = c.ellipse(0.69, 0.47, 0.16, 0.33, soft=0.08) * ~below_l
    lungs = {"right": lung_r, "left": lung_l}
    lung = np.maximum(lung_r, lung_l)
    markings = 0.05 * p.noise * _texture(rng, s, 24) * (1 - np.abs(c.x - 0.5) * 1.2)
    if "Pneumothorax" in by:  # lucent rim without lung markings at the apex/lateral edge
        f = by["Pneumothorax"]
        cx = 0.31 if f.side == "right" else 0.69
        inner = c.ellipse(cx + (0.02 if f.side == "right" else -0.02), 0.5, 0.16 - 0.1 * vis(f) * 0.5,
                          0.33 - 0.12 * vis(f) * 0.5, soft=0.01)
        rim = lungs[f.side] * (1 - inner)
        markings = markings * (1 - rim)
        lungs[f.side] = lungs[f.side] + 0.4 * k * rim
        lung = np.maximum(lung, lungs[f.side])
        c.img += 0.06 * k * np.clip(inner * lungs[f.side] - np.clip(inner - 0.3, 0, 1), 0, 1)  # pleural line
    c.img -= 0.26 * lung
    c.img += markings * lung
    abdomen = (below_r | below_l) & (thorax > 0)
    c.img += 0.18 * abdomen
    c.img += 0.22 * c.ellipse(0.54 + 0.02 * heart_scale, 0.6, 0.12 * heart_scale, 0.13, soft=0.25)
    width = 0.045 * med_scale * (0.7 + 0.6 * np.clip((c.y - 0.1) / 0.4, 0, 1))  # widens towards the hila
    c.img += 0.16 * np.clip((width - np.abs(c.x - 0.5)) / 0.015, 0, 1) * (c.y < 0.62) * (c.y > 0.06)
    c.img += 0.08 * (np.abs(c.x - 0.5) < 0.025) * thorax  # spine
    for side, sx in (("right", -1), ("left", 1)):  # ribs
        for i in range(9):
            y0 = 0.2 + 0.062 * i
            band = c.curve_band(lambda x, y0=y0: y0 + 1.1 * (x - 0.5) ** 2 + 0.1 * np.abs(x - 0.5), 0.011)
            mask = band * ((c.x - 0.5) * sx > 0.05) * ((c.x - 0.5) * sx < 0.38)
            if "Fracture" in by and by["Fracture"].side == side and i == 3 + ZONES.index(by["Fracture"].zone):
                xb = 0.5 + sx * 0.24
                mask = mask * (np.abs(c.x - xb) > 0.006 + 0.012 * vis(by["Fracture"]))
                mask = mask + 0.8 * vis(by["Fracture"]) * c.gauss(xb, y0 + 0.01, 0.012, 0.01)
            c.img += 0.09 * mask * thorax
        c.img += 0.2 * c.segment(0.5 + sx * 0.05, 0.17, 0.5 + sx * 0.3, 0.11, 0.013)  # clavicle
    zone_y = {"upper": 0.3, "mid": 0.47, "lower": 0.62}
    for f in findings:
        if f.name in DRAWN_WITH_ANATOMY:
            continue
        cx = 0.31 if f.side == "right" else 0.69
        cy = zone_y[f.zone]
        lung_side = lungs[f.side]
        v = vis(f)
        if f.name == "Lung Opacity":
            c.img += 0.16 * v * c.gauss(cx, cy, 0.07, 0.08) * lung_side
        elif f.name == "Lung Lesion":
            r = 0.015 + 0.035 * f.severity
            c.img += 0.22 * k * c.ellipse(cx + rng.uniform(-0.05, 0.05), cy, r, r, soft=0.15) * lung_side
        elif f.name == "Consolidation":
            patch = c.gauss(cx, cy, 0.08, 0.07)
            bronchi = c.segment(cx - 0.04, cy - 0.05, cx + 0.03, cy + 0.05, 0.006)
            c.img += 0.3 * v * patch * (1 - 0.5 * bronchi) * lung_side
        elif f.name == "Pneumonia":
            tex = np.clip(_texture(rng, s, 40), 0, 1)
            c.img += 0.28 * v * tex * c.gauss(cx, cy, 0.09, 0.09) * lung_side
        elif f.name == "Edema":
            bat = c.gauss(0.39, 0.46, 0.07, 0.12) + c.gauss(0.61, 0.46, 0.07, 0.12)
            kerley = (np.sin(c.y * 260) > 0.85) * (c.y > 0.55) * (np.abs(c.x - 0.5) > 0.28)
            c.img += (0.16 * v * bat + 0.06 * v * kerley) * lung
        elif f.name == "Atelectasis":
            band = c.segment(cx - 0.08, 0.62, cx + 0.08, 0.6, 0.008 + 0.006 * f.severity)
            c.img += 0.25 * v * band * lung_side
        elif f.name == "Pleural Effusion":
            height = 0.04 + 0.2 * f.severity
            dome = dome_r if f.side == "right" else dome_l
            lateral = np.abs(c.x - 0.5) - 0.15
            level = dome - height + 0.06 * np.clip(1 - lateral / 0.2, 0, 1)  # meniscus rises laterally
            fluid = np.clip((c.y - level) / 0.02, 0, 1)
            c.img += 0.32 * k * fluid * lung_side
        elif f.name == "Pleural Other":
            wall = c.ellipse(cx, 0.47, 0.16, 0.33, soft=0.08) - c.ellipse(cx, 0.47, 0.14, 0.31, soft=0.08)
            c.img += 0.22 * v * np.clip(wall, 0, 1) * (c.y < 0.6)
        elif f.name == "Support Devices":
            if f.device == 0:  # endotracheal tube
                c.img += 0.45 * (c.segment(0.49, 0.0, 0.49, 0.28, 0.004) + c.segment(0.51, 0.0, 0.51, 0.28, 0.004))
            elif f.device == 1:  # central line
                c.img += 0.45 * (c.segment(0.2, 0.14, 0.42, 0.2, 0.004) + c.segment(0.42, 0.2, 0.46, 0.4, 0.004))
            else:  # pacemaker with leads
                c.img += 0.6 * c.ellipse(0.78, 0.18, 0.05, 0.035, soft=0.2)
                c.img += 0.45 * (c.segment(0.74, 0.19, 0.55, 0.35, 0.004) + c.segment(0.55, 0.35, 0.58, 0.6, 0.004))
    # Exposure, contrast, blur and quantum noise.
    img = c.img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(s / 256))
    out = np.asarray(pil, dtype=np.float32) + rng.normal(0, 6.0 * p.noise, (s, s)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def labelled_indices(num_train: int, label_fraction: float, seed: int) -> set[int]:
    """The training studies that keep their labels: the first round(F * N) of one seeded permutation (nested)."""
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label fraction {label_fraction} must be in (0, 1] (the fraction of training studies that "
                         "keep their labels)")
    order = np.random.default_rng([seed, 7919]).permutation(num_train)
    return set(order[: round(label_fraction * num_train)].tolist())


def make_record(job: tuple) -> Record:
    split, index, params, *rest = job
    labelled = rest[0] if rest else True
    p = SyntheticParams(**params)
    rng = np.random.default_rng([p.seed, SPLIT_IDS[split], index])
    labels, findings, findings_text, pathologic = sample_case(rng, p)
    view = "AP" if (labels["Support Devices"] == 1 or rng.random() < 0.3) else "PA"
    text = render_report(rng, labels, findings_text, pathologic, view)
    image = render_image(rng, findings, p)
    pid = f"syn{p.seed}-{split}-{index:07d}"
    if not labelled:
        labels = {name: None for name in labels}
    return Record(key=f"{split}-{index:07d}", image=image, text=normalise_whitespace(text), labels=labels,
                  patient_id=pid, study_id=f"{pid}-s0", view=view, source="synthetic", labelled=labelled)


def normalise_whitespace(text: str) -> str:
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def build_synthetic(out: str | Path, num_train: int, num_val: int, num_test: int, *, image_size: int = 256,
                    seed: int = 0, lesion_contrast: float = 1.0, noise: float = 1.0, label_noise: float = 0.05,
                    prevalence_scale: float = 1.0, label_fraction: float = 1.0, label_seed: Optional[int] = None,
                    samples_per_shard: int = 250, workers: int = 0, fmt: str = "jpg", progress: bool = True) -> dict:
    """Generate the corpus into `out` (shards + dataset.json). Returns the dataset.json contents."""
    params = asdict(SyntheticParams(image_size, seed, lesion_contrast, noise, label_noise, prevalence_scale, fmt))
    labelled = labelled_indices(num_train, label_fraction, seed if label_seed is None else label_seed)
    return write_corpus(out, {"train": num_train, "val": num_val, "test": num_test}, params, make_record,
                        lambda split, i: split != "train" or label_fraction == 1 or i in labelled,
                        label_fraction, samples_per_shard=samples_per_shard, workers=workers, progress=progress,
                        label_seed=label_seed)


def write_corpus(out: str | Path, counts: dict[str, int], params: dict, make: Callable[[tuple], Record],
                 role: Callable[[str, int], Any], label_fraction: float, *, samples_per_shard: int, workers: int,
                 progress: bool, extra: Optional[dict] = None, label_seed: Optional[int] = None) -> dict:
    """The splits' shards from jobs (split, index, params, role(split, index)) and dataset.json. `extra` joins
    `params` where the corpus differs from the default one (in the fingerprint and dataset.json); `label_seed`
    (the labelled subset's seed, where it is not the corpus seed) joins them where it changes the labels."""
    import os

    out = Path(out)
    workers = workers or (os.cpu_count() or 1)
    results = {}
    for split in SPLITS:
        # a label_seed said aloud changes the train split where anything in it is a subset (a testbed's gold too)
        partial_labels = split == "train" and (label_fraction < 1 or label_seed is not None)
        subset = {"label_fraction": label_fraction, **({} if label_seed is None else {"label_seed": label_seed})}
        jobs = [(split, i, params, role(split, i)) for i in range(counts[split])]
        # The fraction enters the fingerprint only where it changes shards: fully labelled ones stay as cached.
        fingerprint = {**params, **(extra or {}), **(subset if partial_labels else {})}
        results[split] = write_split(out, split, jobs, make, samples_per_shard=samples_per_shard,
                                     workers=workers, fmt=params["fmt"], progress=progress,
                                     fingerprint=json.dumps(fingerprint, sort_keys=True))
    sizes = {f"num_{split}": n for split, n in counts.items()}
    return finish_dataset(out, results, {**params, **sizes, "label_fraction": label_fraction,
                                         **({} if label_seed is None else {"label_seed": label_seed}),
                                         "samples_per_shard": samples_per_shard, **(extra or {})}, source="synthetic")
