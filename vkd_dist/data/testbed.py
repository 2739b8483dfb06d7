"""The observation testbed: a synthetic corpus whose report observes the truth instead of defining the labels.

Each study has a TRUE finding state (drawn as in vkd_dist/data/synthetic.py, with every finding drawn in the image:
no label noise); a radiologist reports it, from a generator of its own, with set error rates:
  - a present finding is missed (left out, or negated as an absent one would be) with chance 2 * miss_rate *
    (1 - severity): subtle findings are missed, the mean over findings is miss_rate;
  - an absent finding is reported as present (a false finding) with chance false_rate;
  - a reported finding (true or false) is hedged ("Possible ...", "Cannot exclude ...", "... may represent ...")
    with chance hedge_rate;
  - an absent finding is otherwise negated ("No ...", "Negative for ...") with chance NEGATED_ABSENT, else not
    mentioned; every mention picks its phrase from the generator's banks or a synonym.
Labels: validation and test studies carry the true state (0/1 for every label, as radiologist-labelled test sets
do). A labelled training study carries what the report labeller (vkd_dist/data/labeller.py) reads off its report
- 1, 0, -1 (hedged, read under the data set's label policy) or blank - or, for a seeded gold fraction of the
labelled studies, the true state. Every sample's json also holds `true_labels` and `report_labels` (the
labeller's reading), so the training labels' errors can be counted; the trainer reads `labels` only.
At conversion the labeller's reading of the test reports is scored against the truth (`read_rates`): missed =
present findings read as absent, false = absent findings read as present or uncertain, hedged = read mentions
read as uncertain; they match miss_rate, false_rate and hedge_rate up to sampling and the labeller's own errors.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vkd_dist.data import synthetic
from vkd_dist.data.labeller import ReportLabeller
from vkd_dist.data.schema import Record
from vkd_dist.data.synthetic import (
    FINDINGS,
    NEGATION,
    POSITIVE,
    SIDES,
    SPLIT_IDS,
    UNCERTAIN,
    ZONES,
    Finding,
    SyntheticParams,
    draw_findings,
    fill_template,
    labelled_indices,
    normalise_whitespace,
    render_image,
    render_report,
    write_corpus,
)
from vkd_dist.fileio import atomic_write_text
from vkd_dist.labels import LABELS

NEGATED_ABSENT = 0.45  # an absent (or missed) finding is stated as absent this often, else not mentioned
PATHOLOGY = tuple(n for n in FINDINGS if n != "Support Devices")
ROLES = ("truth", "read", "none")  # a study's labels: the true state, the labeller's reading, none

# Synonyms for the generator's banks: a plain noun phrase per finding, put into the forms below.
NOUNS = {
    "Enlarged Cardiomediastinum": ["mediastinal widening", "widened mediastinum"],
    "Cardiomegaly": ["cardiomegaly", "cardiac enlargement", "enlarged heart"],
    "Lung Opacity": ["airspace opacity", "focal airspace disease", "{side} {zone} infiltrate"],
    "Lung Lesion": ["{side} {zone} pulmonary nodule", "{side} lung mass"],
    "Edema": ["pulmonary edema", "interstitial edema", "pulmonary vascular congestion"],
    "Consolidation": ["{side} {zone} consolidation", "consolidative opacity at the {side} {zone} lung"],
    "Pneumonia": ["{side} {zone} pneumonia", "{side} lower lobe infection"],
    "Atelectasis": ["{side} basilar atelectasis", "{side} lower lobe collapse"],
    "Pneumothorax": ["{side} pneumothorax", "{side} apical pneumothorax"],
    "Pleural Effusion": ["{side} pleural effusion", "{side} pleural fluid"],
    "Pleural Other": ["{side} pleural thickening", "{side} pleural plaque"],
    "Fracture": ["{side} rib fracture", "{side} {zone} rib fracture"],
    "Support Devices": ["endotracheal tube", "central venous catheter", "pacemaker"],  # by device
}
STATED = ["{Noun} is present.", "There is evidence of {noun}.", "Findings are consistent with {noun}."]
HEDGED = ["Possible {noun}.", "Cannot exclude {noun}.", "{Noun} cannot be excluded.", "Questionable {noun}.",
          "Findings may represent {noun}."]
NEGATED = ["No {noun}.", "No evidence of {noun}.", "Negative for {noun}.", "There is no {noun}."]
# The bank's "Patchy ... opacities are concerning for pneumonia" also states an opacity: left out here, where the
# truth and the report must agree finding by finding.
OWN_BANK = {**POSITIVE, "Pneumonia": POSITIVE["Pneumonia"][1:]}


@dataclass(frozen=True)
class ObservationParams:
    miss_rate: float = 0.1  # mean chance a present finding goes unreported (subtle ones more often)
    false_rate: float = 0.02  # chance an absent finding is reported
    hedge_rate: float = 0.15  # chance a reported finding is hedged
    gold_fraction: float = 0.0  # of the labelled training studies, the share labelled with the true state

    def __post_init__(self):
        for name, value, top in (("miss_rate", self.miss_rate, 0.5), ("false_rate", self.false_rate, 1.0),
                                 ("hedge_rate", self.hedge_rate, 1.0), ("gold_fraction", self.gold_fraction, 1.0)):
            if not 0 <= value <= top:
                raise ValueError(f"testbed {name} {value} must be in [0, {top:g}]"
                                 + (" (a finding is missed with chance 2 * miss_rate * (1 - severity))"
                                    if name == "miss_rate" else ""))


def _phrase(rng: np.random.Generator, name: str, f: Finding, bank: list[str], forms: list[str]) -> str:
    """A sentence from the generator's bank for `name` or, half the time, a synonym in one of `forms`."""
    if rng.random() < 0.5:
        return fill_template(bank[int(rng.integers(len(bank)))], f)
    nouns = NOUNS[name]
    noun = nouns[f.device % len(nouns)] if name == "Support Devices" else nouns[int(rng.integers(len(nouns)))]
    if forms is NEGATED:  # "No pneumothorax.", not "No right pneumothorax."
        noun = re.sub(r"\{(side|zone)\} ", "", noun)
    noun = noun.format(side=f.side, zone=f.zone)
    form = forms[int(rng.integers(len(forms)))]
    return form.format(noun=noun, Noun=noun[0].upper() + noun[1:])


def radiologist(rng: np.random.Generator, present: dict[str, Finding], t: ObservationParams):
    """The report of a true state: (sentences, stated sentences, the statuses written {name: 1 | -1 | 0 | None})."""
    sentences: list[str] = []
    stated: list[str] = []
    written: dict[str, Optional[int]] = {}
    for name in FINDINGS:
        f = present.get(name)
        missed = f is not None and rng.random() < 2 * t.miss_rate * (1 - f.severity)
        false = f is None and rng.random() < t.false_rate
        if (f is not None and not missed) or false:
            f = f or Finding(name, False, float(rng.uniform(0.2, 1)), SIDES[int(rng.integers(2))],
                             ZONES[int(rng.integers(3))], int(rng.integers(3)))
            hedged = rng.random() < t.hedge_rate
            bank, forms = (UNCERTAIN[name], HEDGED) if hedged else (OWN_BANK[name], STATED)
            if name == "Support Devices" and not hedged:
                bank = [bank[f.device]]  # the device the image draws
            sentences.append(_phrase(rng, name, f, bank, forms))
            stated.append(sentences[-1])
            written[name] = -1 if hedged else 1
        elif rng.random() < NEGATED_ABSENT:
            g = Finding(name, False, 0.0, "right", "lower")
            sentences.append(_phrase(rng, name, g, NEGATION[name], NEGATED) if rng.random() < 0.5
                             else NEGATION[name][int(rng.integers(len(NEGATION[name])))])
            written[name] = 0
        else:
            written[name] = None
    written["No Finding"] = None if any(written[n] in (1, -1) for n in PATHOLOGY) else 1
    return sentences, stated, written


def true_labels(present: dict[str, Finding]) -> dict[str, Optional[int]]:
    labels: dict[str, Optional[int]] = {name: int(name in present) for name in FINDINGS}
    labels["No Finding"] = int(not any(n in present for n in PATHOLOGY))
    return {name: labels[name] for name in LABELS}


@functools.cache
def labeller() -> ReportLabeller:
    """One per process; built in the parent before the shard writers fork, so they share it."""
    return ReportLabeller()


def make_record(job: tuple) -> Record:
    split, index, params, role = job
    p = SyntheticParams(**{k: v for k, v in params.items() if k in SyntheticParams.__dataclass_fields__})
    t = ObservationParams(**params["testbed"])
    rng = np.random.default_rng([p.seed, SPLIT_IDS[split], index])  # the truth and the image
    present = draw_findings(rng, p)
    view = "AP" if ("Support Devices" in present or rng.random() < 0.3) else "PA"
    report_rng = np.random.default_rng([p.seed, SPLIT_IDS[split], index, 1])  # the radiologist
    sentences, stated, written = radiologist(report_rng, present, t)
    text = normalise_whitespace(render_report(report_rng, written, sentences, [], view, stated=stated))
    image = render_image(rng, list(present.values()), p)
    truth, read = true_labels(present), labeller().read(text)
    labels: dict[str, Optional[int]] = {"truth": truth, "read": read, "none": dict.fromkeys(LABELS)}[role]
    pid = f"tb{p.seed}-{split}-{index:07d}"
    return Record(key=f"{split}-{index:07d}", image=image, text=text, labels=labels, patient_id=pid,
                  study_id=f"{pid}-s0", view=view, source="synthetic", labelled=role != "none",
                  extra={"true_labels": truth, "report_labels": read})


def roles(num_train: int, label_fraction: float, gold_fraction: float, seed: int):
    """(split, index) -> role: val and test the truth; in train, labelled_indices' nested choice (seeded by `seed`,
    the labelled subset's seed) keeps labels, and the first gold_fraction of that same order gets the truth (a
    subset of the labelled studies)."""
    labelled = labelled_indices(num_train, label_fraction, seed)
    gold = labelled_indices(num_train, label_fraction * gold_fraction, seed) if gold_fraction > 0 else set()

    def role(split: str, index: int) -> str:
        if split != "train":
            return "truth"
        return "truth" if index in gold else "read" if index in labelled else "none"

    return role


def build_testbed(out: str | Path, num_train: int, num_val: int, num_test: int, *,
                  testbed: ObservationParams = ObservationParams(), image_size: int = 256, seed: int = 0,
                  lesion_contrast: float = 1.0, noise: float = 1.0, prevalence_scale: float = 1.0,
                  label_fraction: float = 1.0, label_seed: Optional[int] = None, samples_per_shard: int = 250,
                  workers: int = 0, fmt: str = "jpg", progress: bool = True) -> dict:
    """The testbed corpus in `out`; dataset.json's params hold `testbed` (the rates) and `labeller_vs_truth` (the
    labeller's reading of the test reports scored against the truth, see read_rates)."""
    params = asdict(SyntheticParams(image_size, seed, lesion_contrast, noise, 0.0, prevalence_scale, fmt))
    params["testbed"] = asdict(testbed)
    labeller()  # before the writers fork
    subset_seed = seed if label_seed is None else label_seed
    meta = write_corpus(out, {"train": num_train, "val": num_val, "test": num_test}, params, make_record,
                        roles(num_train, label_fraction, testbed.gold_fraction, subset_seed), label_fraction,
                        samples_per_shard=samples_per_shard, workers=workers, progress=progress, label_seed=label_seed)
    shards = [Path(out) / "test" / s["name"] for s in meta["splits"]["test"]["shards"]]
    meta["params"]["labeller_vs_truth"] = read_rates(_metas(shards))
    atomic_write_text(Path(out) / "dataset.json", json.dumps(meta, indent=2))
    return meta


def _metas(shards: Iterable[Path]):
    for path in shards:
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    fh = tf.extractfile(member)
                    if fh is not None:
                        yield json.loads(fh.read())


def read_rates(metas: Iterable[dict]) -> dict:
    """The labeller's reading against the truth over the findings (No Finding is derived): missed (present, read as
    0 or blank), false (absent, read as 1 or -1), hedged (read as -1 among those read as 1 or -1), with counts."""
    present = missed = absent = false = mentioned = hedged = 0
    for meta in metas:
        truth, read = meta["true_labels"], meta["report_labels"]
        for name in FINDINGS:
            said = read[name] in (1, -1)
            mentioned += said
            hedged += read[name] == -1
            if truth[name] == 1:
                present += 1
                missed += not said
            else:
                absent += 1
                false += said
    rate = lambda k, n: round(k / n, 4) if n else None  # noqa: E731
    return {"missed": rate(missed, present), "false": rate(false, absent), "hedged": rate(hedged, mentioned),
            "present": present, "absent": absent, "mentioned": mentioned}


def rates_line(meta: dict) -> str:
    r, t = meta["params"]["labeller_vs_truth"], meta["params"]["testbed"]
    return (f"labeller vs truth on test ({r['present']} present, {r['absent']} absent findings): missed "
            f"{r['missed']:.3f} (miss_rate {t['miss_rate']}), false {r['false']:.3f} (false_rate {t['false_rate']}), "
            f"hedged {r['hedged']:.3f} of {r['mentioned']} read mentions (hedge_rate {t['hedge_rate']})")


def build_corpus(out: str | Path, knobs: dict, **options) -> dict:
    """The synthetic corpus, or the testbed where knobs["testbed"] is true, from the flat knobs of the config's
    data.synthetic (absent ones take their defaults); `options`: samples_per_shard, workers, fmt, progress."""
    sizes = (knobs["num_train"], knobs["num_val"], knobs["num_test"])
    options = {"progress": False, **options}
    options.update({k: knobs[k] for k in ("image_size", "seed", "lesion_contrast", "noise", "prevalence_scale",
                                          "label_fraction", "label_seed") if k in knobs})
    if not knobs.get("testbed"):
        return synthetic.build_synthetic(out, *sizes, label_noise=knobs.get("label_noise", 0.05), **options)
    rates = ObservationParams(**{k: knobs[k] for k in ObservationParams.__dataclass_fields__ if k in knobs})
    return build_testbed(out, *sizes, testbed=rates, **options)
