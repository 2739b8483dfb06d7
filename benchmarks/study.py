"""A study: objectives ("arms") x seeds x data regimes, every cell a real training run, with honest error bars.

    python -m benchmarks.study                               # the full grid, 150 cells, into runs/study
    python -m benchmarks.study --quick                       # QUICK below, into runs/study-quick
    python -m benchmarks.study --evidence                    # EVIDENCE below, into runs/study-evidence
    python -m benchmarks.study --regimes n500,labels0.1 --arms vkd,image_only --seeds 3 --set train.max_steps=300
    python -m benchmarks.study --arm beta1=objective.beta=1.0,objective.beta_schedule=constant --arms image_only
    python -m benchmarks.study --arm neg=data.missing=negative --policy-control neg --arms vkd,image_only
    python -m benchmarks.study --report-only --out runs/study  # study.md, plots, comparisons again; no training

Grid. Regimes are settings of the synthetic corpus (vkd_dist/data/synthetic.py), one factor varied at a time
around a base (BASE_REGIME, CORPUS): `n<N>` sets num_train, `noise<p>` label_noise, `contrast<c>`
lesion_contrast, `labels<F>` label_fraction (0 < F <= 1: a seeded 1 - F of the training studies keep image and
report but have no labels; the labelled subsets are nested, the images and reports those of the fully labelled
corpus; `labels1` is the base), the other knobs staying at the base (`--corpus key=value` moves the base or the
split sizes; two names for one corpus are refused). The full grid is n500, n2000 (the base), n8000, noise0.2,
contrast0.5, contrast0.25, with 400 validation and 1,000 test studies each and data seed 0, so every arm and seed
of a regime is scored on the same test samples (the comparisons are paired). Each regime's corpus is built once
into OUT/data/<regime>. Seeds are train.seed=0..N-1.

Arms are the ARMS table: key=value overrides on the base config (configs/default.yaml, or --config). The full
grid runs DEFAULT_ARMS (vkd, vkd_paper, image_only, text_only, kd); the VKD variants vkd_mean, vkd_sep, vkd_reg,
vkd_reg_init and vkd_distil run when named (vkd_distil with --evidence). An override KEY=@ARM gives KEY the
path of ARM's run of the same regime and seed (vkd_reg_init: objective.text_init=@text_only), and an arm of
objective kd gets objective.kd_teacher=@text_only unless it sets that key: ARM is added to the grid and runs
first, and a cell whose ARM run has not finished fails without training.

Label policy. Every arm trains under one label policy: data.missing and data.uncertain as the base config and
--set leave them (unset: the data set's own training policy, dataset.json train_policy). An arm whose overrides
give either another value is refused (exit 2) unless it is named with --policy-control ARM (repeatable, part of
the grid): a deliberate comparison of policies, marked as such in study.md.

Presets (explicit flags still win): --quick, the faint-lesion regime contrast0.5, vkd against image_only, 3 seeds,
300 steps: 6 cells, ~15 minutes on 2 CPU cores. --evidence, labels0.1 and the base n2000; image_only, kd (with
its text_only teacher), vkd and vkd_distil (the validation pilot's best variant, with the same text_only run as
its text_init); 5 seeds; 300 steps, validation every 100 so that best/ is picked on validation: 50 cells.

Per-cell budget. Every cell trains train.max_steps x data.batch_size x optim.grad_accum samples, the same for
every arm (arms may not set those keys; `--set` sets them for all). study.json and study.md state it.

A cell runs `python -m vkd_dist.train` in a subprocess (run_dir OUT/runs/<regime>/<arm>/seed<k>, resume=latest,
offline; its output in RUN/train.log) and is scored from what the trainer writes: RUN/test_metrics.json (the
final/ model on the test split) and the validation macro AUROC in RUN/best/meta.json. A failed cell is recorded
(exit code, the end of its log) and the study goes on. SIGTERM to the study stops the running cell at a step
boundary with a checkpoint (Ctrl-C stops it too, at its last periodic checkpoint). Rerunning the same command
skips done cells, retries failed ones and resumes interrupted ones through the trainer's own resume; a different
grid in the same OUT is refused (exit 2), naming the difference. At the README's ~7 min per 600-step default
run, the full grid is over a day on 2 CPU cores (an estimate: it has not been run).

Outputs in OUT: study.json (the grid, the budget, every cell, per regime x arm summaries with a 95 %
t-interval over seeds, the paired comparisons), study.md (the table), auroc_vs_train_size.png and, where the
grid varies them, auroc_vs_label_noise.png, auroc_vs_lesion_contrast.png and auroc_vs_label_fraction.png (log
axis; the base, fully labelled, is its point at 1). Each image-inference arm is
compared with image_only within each regime by vkd_dist.compare (each arm's seeds averaged, one paired patient
bootstrap for the delta's 95 % CI and p), on the final/ checkpoints that test_metrics.json describes. text_only
reads the report at inference: it is listed as the teacher's ceiling, not compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

if __package__ in (None, ""):  # run as a file: import the package from the repository, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.bench import REPO  # noqa: E402
from benchmarks.study_plots import PLOTS, plot_knob  # noqa: E402
from vkd_dist.fileio import atomic_write_text  # noqa: E402

# ------------------------------------------------------------------------------------------------ the grid
REG = ["objective.detach_posterior=true", "objective.image_bce=mean", "objective.free_bits=0.1"]
ARMS: dict[str, list[str]] = {  # name -> key=value overrides on the base config (KEY=@ARM: ARM's run, same cell)
    "vkd": [],  # the embedded default
    "vkd_paper": ["objective.prior_bce_weight=0", "objective.beta=1.0", "objective.beta_schedule=constant",
                  "model.text_encoder=minilm", "model.freeze_text=true"],  # the paper's objective, frozen MiniLM
    "image_only": ["objective.name=image_only"],
    "text_only": ["objective.name=text_only"],
    "kd": ["objective.name=kd"],  # + objective.kd_teacher=@text_only (OBJECTIVE_RUNS)
    "vkd_mean": ["objective.image_bce=mean"],  # the image path's BCE on mu_p, what inference reads
    # the authors' separate image classifier on [z_p, image features]
    "vkd_sep": ["model.image_head=separate", "objective.image_bce=mean"],
    "vkd_reg": REG,  # distillation as regression onto the teacher's code: q detached in the KL, 0.1 nats/dim free
    "vkd_reg_init": [*REG, "objective.text_init=@text_only"],  # vkd_reg, its report path from text_only's weights
    # the validation pilot's best VKD (README "Evidence"): vkd_reg_init's KL at beta 0.1, a separate image
    # classifier, and the report path's predictive as the image path's target on every study (weight 4)
    "vkd_distil": [*REG, "objective.text_init=@text_only", "model.image_head=separate",
                   "objective.predictive_weight=4.0"],
}
DEFAULT_ARMS = ["vkd", "vkd_paper", "image_only", "text_only", "kd"]  # the full grid's
BASELINE = "image_only"  # what every image-inference arm is compared with
RUN_REF = re.compile(r"@([A-Za-z0-9_.-]+)")  # KEY=@ARM: the path of ARM's run of the same regime and seed
OBJECTIVE_RUNS = {"kd": ("objective.kd_teacher", "text_only")}  # objective -> KEY=@ARM, unless an arm sets KEY
POLICY_KEYS = ("data.missing", "data.uncertain")  # one label policy per study (but --policy-control arms)
BASE_REGIME = {"num_train": 2000, "label_noise": 0.05, "lesion_contrast": 1.0, "label_fraction": 1.0}
VARIED: dict[str, list[Any]] = {"num_train": [500, 2000, 8000], "label_noise": [0.05, 0.2],
                                "lesion_contrast": [1.0, 0.5, 0.25]}
CORPUS = {"num_val": 400, "num_test": 1000, "image_size": 128, "seed": 0}  # every regime
PREFIX = {"noise": "label_noise", "contrast": "lesion_contrast", "labels": "label_fraction",
          "n": "num_train"}  # regime name -> knob; "noise" before "n"
SEEDS = 5
# --quick (explicit flags still win): the faint-lesion regime, the default against its baseline, 3 seeds, half the
# default's steps: 6 cells, ~15 minutes on 2 CPU cores (README "Evidence")
QUICK: dict[str, Any] = {
    "regimes": ["contrast0.5"], "arms": ["vkd", "image_only"], "seeds": 3,
    "set": ["train.max_steps=300", "train.eval_every=300", "train.ckpt_every=300"], "out": "runs/study-quick",
}
# --evidence: a tenth of the labels against all of them, the VKD variants against image_only and kd, 5 seeds,
# validation every 100 steps (best/ picked on it): 80 cells with kd's teacher
EVIDENCE: dict[str, Any] = {
    "regimes": ["labels0.1", "n2000"], "seeds": 5, "out": "runs/study-evidence",
    "arms": ["image_only", "kd", "vkd", "vkd_distil"],
    "set": ["train.max_steps=300", "train.eval_every=100", "train.ckpt_every=300"],
}
CHECKPOINT = "final"  # the model test_metrics.json describes; the comparisons use the same one
OWNED = ("run_dir", "resume", "train.seed", "data.path", "data.synthetic")  # the study sets these per cell
AGREED = {"data.build_synthetic": False}  # also set per cell; a --set that says the same is harmless
BUDGET_KEYS = ("train.max_steps", "data.batch_size", "optim.grad_accum")  # the same for every arm
TAIL_LINES = 20  # of a failed cell's log, kept as its error


class StudyError(Exception):
    """A problem with the command line or OUT: one line, exit 2."""


class Interrupted(Exception):
    """SIGTERM to the study: the running cell is stopped with a checkpoint, to be resumed by the next run."""


# ------------------------------------------------------------------------------------------ building the grid
def regime_name(knob: str, value: float) -> str:
    prefix = next(p for p, k in PREFIX.items() if k == knob)
    return f"{prefix}{value:g}"


def knob_value(knob: str, text: str, where: str) -> float:
    """A corpus knob's value, checked: sizes are positive integers, label_fraction is in (0, 1]."""
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text.strip()):
        raise StudyError(f"{where}: {text!r} is not a number")
    value = float(text)
    if knob in ("num_train", "num_val", "num_test", "image_size"):
        if not value.is_integer() or value < 1:
            raise StudyError(f"{where}: {knob} must be a positive integer")
        return int(value)
    if knob == "label_fraction" and not 0 < value <= 1:
        raise StudyError(f"{where}: label_fraction (the labelled fraction of the training studies) must be in (0, 1]")
    return value


def parse_regime(name: str, base: dict) -> tuple[str, dict]:
    """`n500` / `noise0.2` / `contrast0.25` / `labels0.1` -> (the name as the study writes it, the base corpus with
    that knob set)."""
    for prefix, knob in PREFIX.items():  # "noise" before "n"
        if name.startswith(prefix):
            value = knob_value(knob, name[len(prefix):], f"regime {name} ({prefix}<{knob}>)")
            return regime_name(knob, value), {**base, knob: value}
    raise StudyError(f"regime {name!r}: expected n<train size>, noise<label noise>, contrast<lesion contrast> or "
                     "labels<labelled fraction>, e.g. n500, noise0.2, contrast0.5, labels0.1")


def default_regimes(base: dict) -> list[str]:
    """The base and one regime per other value of each varied knob."""
    names = [regime_name("num_train", v) for v in sorted({*VARIED["num_train"], base["num_train"]})]
    for knob in ("label_noise", "lesion_contrast"):
        names += [regime_name(knob, v) for v in VARIED[knob] if v != base[knob]]
    return names


def parse_corpus(items: list[str]) -> dict:
    base = {**BASE_REGIME, **CORPUS}
    allowed = [k for k in base if k != "seed"]
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in allowed:
            raise StudyError(f"--corpus {item}: expected KEY=VALUE with KEY one of {', '.join(allowed)}")
        base[key.strip()] = knob_value(key.strip(), value, f"--corpus {item}")
    return base


def override_key(item: str, flag: str) -> str:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise StudyError(f"{flag} {item!r} is not of the form key=value")
    return key.strip()


def check_overrides(items: list[str], flag: str, arm: bool) -> None:
    """The study's own keys (and, in an arm, the budget's) are refused."""
    for item in items:
        key = override_key(item, flag)
        if key in OWNED or key.startswith("data.synthetic."):
            raise StudyError(f"{flag} {item}: {key} is the study's to set per cell (see --corpus, --seeds, --out)")
        if key in AGREED and yaml.safe_load(item.partition("=")[2]) != AGREED[key]:
            raise StudyError(f"{flag} {item}: the study sets {key}={str(AGREED[key]).lower()} in every cell")
        if arm and key in BUDGET_KEYS:
            raise StudyError(f"{flag} {item}: the budget is the same for every arm; set {key} with --set")


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """`NAME=key=value,key=value` (commas split only before a key=...)."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"--arm {spec!r}: expected NAME=key=value[,key=value...] (NAME: letters, digits, _ . -)")
    if name in ARMS:
        raise StudyError(f"--arm {name}: a built-in arm (ARMS in benchmarks/study.py); choose another name")
    overrides = [s.strip() for s in re.split(r",(?=\s*[\w.]+=)", rest) if s.strip()]
    check_overrides(overrides, f"--arm {name}:", arm=True)
    return name, overrides


def config_layers(config: Optional[str]) -> list:
    """What the cells' config is built from besides the overrides: default.yaml's mapping and --config's."""
    from vkd_dist.config import DEFAULT_CONFIG

    layers = [yaml.safe_load(DEFAULT_CONFIG.read_text())]
    if config:
        if not Path(config).is_file():
            raise StudyError(f"--config {config}: no such file")
        layers.append(yaml.safe_load(Path(config).read_text()))
    return layers


def setting(grid: dict, overrides: list[str], key: str, alias: Optional[str] = None) -> Any:
    """A dotted key's value in a cell with these arm overrides: the config layers, --set, the overrides (the last
    wins); None where nothing sets it."""
    value, (*path, leaf) = None, key.split(".")
    for layer in grid["config_yaml"]:
        node = layer
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node[leaf]
    for item in [*grid["set"], *overrides]:
        k, _, v = item.partition("=")
        if k.strip() in (key, alias):
            value = yaml.safe_load(v) if v.strip() else None
    return value


def arm_objective(grid: dict, overrides: list[str]) -> str:
    return str(setting(grid, overrides, "objective.name", alias="objective") or "vkd")


def runs_of(grid: dict, overrides: list[str]) -> dict[str, str]:
    """Key -> the arm whose run of the same regime and seed it receives: KEY=@ARM (the last setting of KEY wins),
    and OBJECTIVE_RUNS for the arm's objective where --set and the arm leave its key alone."""
    refs: dict[str, Optional[str]] = {}
    for item in [*grid["set"], *overrides]:
        key, _, value = item.partition("=")
        ref = RUN_REF.fullmatch(value.strip())
        refs[key.strip()] = ref.group(1) if ref else None
    rule = OBJECTIVE_RUNS.get(arm_objective(grid, overrides))
    if rule and rule[0] not in refs:
        refs[rule[0]] = rule[1]
    return {key: arm for key, arm in refs.items() if arm}


def _policy(value: Any) -> str:
    return "null (the data set's training policy)" if value is None else str(value)


def check_policy(grid: dict) -> None:
    """Every arm but the policy controls under one label policy: the shared one (config, --set) where an arm leaves
    the key alone, else the first arm's."""
    arms = [a for a in grid["arms"] if a not in grid["policy_control"]]
    for key in POLICY_KEYS:
        values = {a: setting(grid, grid["arms"][a], key) for a in arms}
        leave = [a for a in arms if key not in (override_key(i, "") for i in grid["arms"][a])]
        ref = setting(grid, [], key) if leave else values[arms[0]] if arms else None
        for arm, value in values.items():
            if value != ref:
                raise StudyError(f"arm {arm}: {key}={_policy(value)}, where the other arms train under {key}="
                                 f"{_policy(ref)}; one label policy per study: set it for all with --set, or name "
                                 f"{arm} with --policy-control {arm}")


def preset_of(args: argparse.Namespace) -> dict:
    return QUICK if args.quick else EVIDENCE if args.evidence else {}


def build_grid(args: argparse.Namespace) -> dict:
    preset = preset_of(args)
    base = parse_corpus([*preset.get("corpus", []), *args.corpus])
    custom = dict(parse_arm(spec) for spec in args.arm)
    known = {**ARMS, **custom}
    names = [n.strip() for n in args.arms.split(",") if n.strip()] if args.arms else list(preset.get("arms")
                                                                                          or DEFAULT_ARMS)
    names += [n for n in custom if n not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StudyError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(known)}; define one with --arm)")
    settings = [*preset.get("set", []), *args.set]
    check_overrides(settings, "--set", arm=False)
    seeds = args.seeds if args.seeds is not None else preset.get("seeds", SEEDS)
    if seeds < 1:
        raise StudyError("--seeds must be at least 1")
    grid: dict[str, Any] = {"config": args.config, "config_yaml": config_layers(args.config), "base": base,
                            "regimes": {}, "arms": {}, "seeds": list(range(seeds)), "set": settings}
    for name in args.regimes.split(",") if args.regimes else preset.get("regimes") or default_regimes(base):
        if name.strip():
            regime, knobs = parse_regime(name.strip(), base)
            same = [r for r, k in grid["regimes"].items() if k == knobs and r != regime]
            if same:
                raise StudyError(f"regimes {same[0]} and {regime} are the same corpus; keep one")
            grid["regimes"][regime] = knobs
    if not grid["regimes"] or not names:
        raise StudyError("the grid is empty: give at least one regime and one arm")

    def add(name: str, chain: tuple[str, ...]) -> None:  # an arm whose run another reads runs before it
        if name in grid["arms"]:
            return
        if name in chain:
            raise StudyError(f"arm {name} reads its own run ({' -> '.join([*chain, name])})")
        for key, source in runs_of(grid, known[name]).items():
            if source not in known:
                raise StudyError(f"arm {name}: {key}=@{source}: no arm {source!r} (known: {', '.join(known)})")
            if source not in grid["arms"] and source not in names:
                print(f"[study] arm {name} reads {source}'s run of the same regime and seed ({key}): {source} added",
                      file=sys.stderr)
            add(source, (*chain, name))
        grid["arms"].setdefault(name, known[name])

    for name in dict.fromkeys(names):
        add(name, ())
    unknown = [a for a in args.policy_control if a not in grid["arms"]]
    if unknown:
        raise StudyError(f"--policy-control {unknown[0]}: not an arm of this grid ({', '.join(grid['arms'])})")
    grid["policy_control"] = [a for a in grid["arms"] if a in args.policy_control]
    check_policy(grid)
    return json.loads(json.dumps(grid))  # as study.json will hold it, for comparing with the one there


def _named(a: dict, b: dict, what: str) -> list[str]:
    items = [f"{k} missing" for k in a if k not in b] + [f"{k} added" for k in b if k not in a]
    for k in a:
        if k in b and a[k] != b[k]:
            if isinstance(a[k], dict):
                items.append(f"{k} " + ", ".join(f"{x} {a[k].get(x)} vs {b[k].get(x)}" for x in a[k]
                                                 if a[k].get(x) != b[k].get(x)))
            else:
                items.append(f"{k} {' '.join(a[k]) or '(none)'} vs {' '.join(b[k]) or '(none)'}")
    return [f"{what}: {', '.join(items)}"] if items else []


def _only(a: list[str], b: list[str]) -> list[str]:
    """The items of a that b lacks (counting repeats), in a's order."""
    rest, out = list(b), []
    for x in a:
        if x in rest:
            rest.remove(x)
        else:
            out.append(x)
    return out


def grid_difference(held: dict, asked: dict) -> list[str]:
    """What differs, held (study.json) first."""
    out = []
    if held["config"] != asked["config"]:
        out.append(f"--config {held['config'] or '(default)'} vs {asked['config'] or '(default)'}")
    elif held["config_yaml"] != asked["config_yaml"]:
        out.append(f"the config ({held['config'] or 'configs/default.yaml'}) changed since the study began")
    out += _named(held["regimes"], asked["regimes"], "regimes")
    out += _named(held["arms"], asked["arms"], "arms")
    if held["policy_control"] != asked["policy_control"]:
        out.append(f"--policy-control {' '.join(held['policy_control']) or '(none)'} vs "
                   f"{' '.join(asked['policy_control']) or '(none)'}")
    if held["seeds"] != asked["seeds"]:
        counted = all(seeds == list(range(len(seeds))) for seeds in (held["seeds"], asked["seeds"]))
        out.append(f"seeds {len(held['seeds'])} != {len(asked['seeds'])}" if counted
                   else f"seeds {held['seeds']} != {asked['seeds']}")
    if held["set"] != asked["set"]:
        only_held, only_asked = _only(held["set"], asked["set"]), _only(asked["set"], held["set"])
        if not only_held and not only_asked:  # the same items in another order: the later one wins
            only_held, only_asked = held["set"], asked["set"]
        out.append(f"--set {' '.join(only_held) or '(none)'} vs {' '.join(only_asked) or '(none)'}")
    return out


def cells_of(grid: dict) -> list[tuple[str, str, int]]:
    """Execution order: regime, then seed, then arm (teachers first): a partial study stays balanced."""
    return [(r, a, s) for r in grid["regimes"] for s in grid["seeds"] for a in grid["arms"]]


def cell_key(regime: str, arm: str, seed: int) -> str:
    return f"{regime}/{arm}/seed{seed}"


def run_rel(regime: str, arm: str, seed: int) -> str:
    return f"runs/{regime}/{arm}/seed{seed}"


def cell_overrides(grid: dict, out: Path, regime: str, arm: str, seed: int) -> list[str]:
    """--set, then the arm's own keys (they win), then the study's per-cell keys."""
    knobs, runs = grid["regimes"][regime], runs_of(grid, grid["arms"][arm])
    own = [i for i in [*grid["set"], *grid["arms"][arm]] if override_key(i, "") not in runs]  # KEY=@ARM: below
    return [*own, f"data.path={(out / 'data' / regime).resolve()}", "data.build_synthetic=false",
            *(f"data.synthetic.{k}={v}" for k, v in knobs.items()), f"train.seed={seed}",
            f"run_dir={(out / run_rel(regime, arm, seed)).resolve()}", "resume=latest",
            *(f"{key}={(out / run_rel(regime, source, seed)).resolve()}" for key, source in runs.items())]


def resolve(grid: dict, out: Path) -> dict:
    """What the cells' configs say, once per study: the per-cell budget (from the base config and --set: arms may
    not change it) and each arm's objective, and whether it reads the report at inference."""
    from vkd_dist.config import ConfigError, load_config
    from vkd_dist.objectives import TEXT, get_objective

    first = next(iter(grid["regimes"]))
    try:
        cfg = load_config(grid["config"], [*grid["set"], f"data.path={(out / 'data' / first).resolve()}",
                                           "data.build_synthetic=true", f"run_dir={(out / 'runs').resolve()}"])
    except ConfigError as exc:
        raise StudyError(f"config error in --config/--set: {exc}") from None
    steps, batch, accum = cfg.train.max_steps, cfg.data.batch_size, cfg.optim.grad_accum
    arms = {}
    for arm in grid["arms"]:
        objective = arm_objective(grid, grid["arms"][arm])
        try:
            report = get_objective(objective).inference == TEXT
        except KeyError:  # an unknown objective: its cells fail with the trainer's message
            report = False
        arms[arm] = {"objective": objective, "reads_report": report, "runs_of": runs_of(grid, grid["arms"][arm])}
    return {"budget": {"max_steps": steps, "batch_size": batch, "grad_accum": accum,
                       "samples_per_cell": steps * batch * accum}, "arm_info": arms}


def budget_text(b: dict) -> str:
    accum = f" x grad_accum {b['grad_accum']}" if b["grad_accum"] != 1 else ""
    return (f"{b['max_steps']} steps x batch {b['batch_size']}{accum} = {b['samples_per_cell']:,} training samples "
            "per cell")


# ------------------------------------------------------------------------------------------ running cells
def build_corpora(grid: dict, out: Path) -> None:
    for name, knobs in grid["regimes"].items():
        path = out / "data" / name
        if (path / "dataset.json").is_file():
            continue
        from vkd_dist.data.synthetic import build_synthetic

        t0 = time.time()
        build_synthetic(path, knobs["num_train"], knobs["num_val"], knobs["num_test"], image_size=knobs["image_size"],
                        seed=knobs["seed"], lesion_contrast=knobs["lesion_contrast"],
                        label_noise=knobs["label_noise"], label_fraction=knobs["label_fraction"], progress=False)
        print(f"[study] corpus {name}: built in {time.time() - t0:.0f} s ({path})", flush=True)


def log_tail(log_path: Path, marker: str) -> str:
    """The last TAIL_LINES lines of the latest attempt in a cell's log."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    lines = text[text.rfind(marker):].splitlines()[1:] if marker in text else text.splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def read_metrics(run_dir: Path, since: float = 0.0) -> dict:
    """Test macro AUROC (RUN/test_metrics.json, written after `since`) and best/'s validation macro AUROC."""
    path = run_dir / "test_metrics.json"
    if not path.is_file() or path.stat().st_mtime < since:
        raise ValueError("no test_metrics.json from this run: it stopped before its test pass")
    test = json.loads(path.read_text())
    if not isinstance(test.get("macro_auroc"), float):
        raise ValueError("test_metrics.json has no macro_auroc")
    out = {"test_macro_auroc": test["macro_auroc"], "test_macro_auroc_ci": test.get("macro_auroc_ci"),
           "test_checkpoint": test.get("checkpoint"), "best_val_macro_auroc": None, "best_step": None}
    meta = run_dir / "best" / "meta.json"
    if meta.is_file():
        best = json.loads(meta.read_text())
        out["best_val_macro_auroc"], out["best_step"] = best.get("val", {}).get("macro_auroc"), best.get("step")
    return out


def error_line(error: Optional[str]) -> str:
    """A failed cell's error in one line: what failed, and the log's last line (the exception, usually)."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return lines[0] + (f": {lines[-1].strip()}" if len(lines) > 1 else "") if lines else ""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_cell(grid: dict, out: Path, regime: str, arm: str, seed: int) -> dict:
    """One training run in a subprocess; its record (status ok or failed)."""
    run_dir = out / run_rel(regime, arm, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vkd_dist.train"]
    if grid["config"]:
        cmd += ["--config", str(Path(grid["config"]).resolve())]
    cmd += cell_overrides(grid, out, regime, arm, seed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    marker = f"=== study: attempt at {time.strftime('%Y-%m-%d %H:%M:%S')}"
    started = time.time()
    with open(run_dir / "train.log", "a") as log:  # appended: earlier attempts stay readable above
        log.write(f"{marker}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the trainer checkpoints at its next step and stops
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    record: dict[str, Any] = {"exit_code": code, "seconds": round(time.time() - started, 1), "error": None}
    try:
        if code != 0:
            raise ValueError(f"exit code {code}")
        record.update(read_metrics(run_dir, since=started - 1), status="ok")
    except (ValueError, OSError) as exc:
        record.update(status="failed", error=f"{exc}\n{log_tail(run_dir / 'train.log', marker)}")
    return record


def load_study(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        study = json.loads(path.read_text())
        for knobs in [study["grid"]["base"], *study["grid"]["regimes"].values()]:  # before label_fraction
            knobs.setdefault("label_fraction", 1.0)
        study["grid"].setdefault("policy_control", [])
    except (ValueError, KeyError, TypeError) as exc:
        raise StudyError(f"{path}: not a study file ({exc}); start another --out") from None
    return study


def write_study(out: Path, study: dict) -> None:
    study["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(out / "study.json", json.dumps(study, indent=1))


def provenance() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def run_cells(grid: dict, out: Path, study: dict) -> bool:
    """Every cell not done yet, in order; study.json rewritten after each. False when interrupted."""
    todo = cells_of(grid)
    for i, (regime, arm, seed) in enumerate(todo, 1):
        key = cell_key(regime, arm, seed)
        head = f"[study] {i}/{len(todo)} {key}"
        old = study["cells"].get(key, {})
        if old.get("status") == "ok":
            print(f"{head}: skipped (done: test macro AUROC {old['test_macro_auroc']:.3f})", flush=True)
            continue
        cell = {"regime": regime, "arm": arm, "seed": seed, "run_dir": run_rel(regime, arm, seed),
                "attempts": old.get("attempts", 0) + 1, "status": "running"}
        waiting = [f"{cell_key(regime, a, seed)} ({k})" for k, a in runs_of(grid, grid["arms"][arm]).items()
                   if study["cells"].get(cell_key(regime, a, seed), {}).get("status") != "ok"]
        if waiting:
            cell.update(status="failed", exit_code=None, seconds=0.0,
                        error=f"the run it reads, {', '.join(waiting)}, has not finished")
            study["cells"][key] = cell
            write_study(out, study)
            print(f"{head}: failed ({cell['error']})", flush=True)
            continue
        again = {"failed": " (retrying)", "running": " (resuming)", "interrupted": " (resuming)"}
        print(f"{head}: training{again.get(old.get('status', ''), '')} ...", flush=True)
        study["cells"][key] = cell
        write_study(out, study)
        try:
            cell.update(run_cell(grid, out, regime, arm, seed))
        except (KeyboardInterrupt, Interrupted):
            cell["status"] = "interrupted"
            write_study(out, study)
            print(f"{head}: interrupted; the same command resumes it", flush=True)
            return False
        write_study(out, study)
        if cell["status"] == "ok":
            print(f"{head}: test macro AUROC {cell['test_macro_auroc']:.3f} ({cell['seconds']:.0f} s)", flush=True)
        else:
            print(f"{head}: failed, {error_line(cell['error'])} ({cell['seconds']:.0f} s); "
                  f"log: {out / cell['run_dir'] / 'train.log'}", flush=True)
    return True


# ------------------------------------------------------------------------------------------ the results
def t_interval(values: list[float], level: float = 0.95) -> tuple[Optional[float], Optional[float], Optional[list]]:
    """(mean, sd, [lo, hi]) with a t-interval over the values (seeds); sd and interval need two."""
    if not values:
        return None, None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None, None
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean, sd, [mean - half, mean + half]


def ok_cells(study: dict, regime: str, arm: str) -> list[dict]:
    cells = (study["cells"].get(cell_key(regime, arm, s), {}) for s in study["grid"]["seeds"])
    return [c for c in cells if c.get("status") == "ok"]


def summarise(study: dict) -> list[dict]:
    grid, rows = study["grid"], []
    for regime in grid["regimes"]:
        for arm in grid["arms"]:
            cells = [study["cells"].get(cell_key(regime, arm, s), {}) for s in grid["seeds"]]
            ok = [c for c in cells if c.get("status") == "ok"]
            values = [c["test_macro_auroc"] for c in ok]
            mean, sd, ci = t_interval(values)
            val = [c["best_val_macro_auroc"] for c in ok if c.get("best_val_macro_auroc") is not None]
            info = study["arm_info"][arm]
            rows.append({"regime": regime, "arm": arm, "objective": info["objective"],
                         "reads_report": info["reads_report"], "n_ok": len(ok),
                         "n_failed": sum(c.get("status") == "failed" for c in cells),
                         "seeds_ok": [c["seed"] for c in ok], "test_macro_auroc": values, "mean": mean, "sd": sd,
                         "ci95": ci, "best_val_macro_auroc_mean": sum(val) / len(val) if val else None,
                         "seconds_mean": sum(c["seconds"] for c in ok) / len(ok) if ok else None})
    return rows


def _fingerprint(out: Path, cells: list[dict]) -> list:
    """Which exported models a comparison read: a rerun reuses it while they are unchanged."""
    fp = []
    for c in cells:
        weights = (out / c["run_dir"] / CHECKPOINT).resolve() / "model.safetensors"  # final/ -> .final.vN/
        fp.append([os.path.relpath(weights, out.resolve()), weights.stat().st_mtime_ns if weights.is_file() else None])
    return fp


def comparisons(study: dict, out: Path, n_boot: int, force: bool) -> list[dict]:
    """Every image-inference arm against image_only, per regime (vkd_dist.compare, all ok seeds at once)."""
    grid, summaries = study["grid"], {(s["regime"], s["arm"]): s for s in study["summaries"]}
    cached = {(c["regime"], c["arm"]): c for c in study.get("comparisons", [])}
    result: list[dict] = []
    if BASELINE not in grid["arms"]:
        return result
    for regime in grid["regimes"]:
        base = ok_cells(study, regime, BASELINE)
        for arm in grid["arms"]:
            if arm == BASELINE or summaries[(regime, arm)]["reads_report"]:
                continue
            cells = ok_cells(study, regime, arm)
            entry: dict[str, Any] = {"regime": regime, "arm": arm, "baseline": BASELINE, "checkpoint": CHECKPOINT}
            if not cells or not base:
                entry["skipped"] = f"no finished run of {arm if not cells else BASELINE} in {regime}"
                result.append(entry)
                continue
            entry.update(seeds_a=[c["seed"] for c in cells], seeds_b=[c["seed"] for c in base],
                         fingerprint=_fingerprint(out, cells + base))
            old = cached.get((regime, arm), {})
            if (not force and old.get("fingerprint") == entry["fingerprint"] and "delta" in old
                    and old["bootstrap"]["resamples"] == n_boot):
                result.append(old)
                continue
            try:
                from vkd_dist.compare import compare

                r = compare([str(out / c["run_dir"]) for c in cells], [str(out / c["run_dir"]) for c in base],
                            str((out / "data" / regime).resolve()), "test", CHECKPOINT, n_boot=n_boot)
            except Exception as exc:  # one comparison must not lose the others
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                result.append(entry)
                continue
            entry.update(delta=r["delta_macro_auroc"], ci=r["ci"], p_value=r["p_value"],
                         macro_auroc_a=r["macro_auroc_a"], macro_auroc_b=r["macro_auroc_b"],
                         per_seed_delta=r["per_seed_delta"], num_samples=r["num_samples"],
                         num_patients=r["num_patients"], macro_labels=len(r["macro_labels"]), bootstrap=r["bootstrap"])
            result.append(entry)
    return result


def _f(v: Optional[float], signed: bool = False) -> str:
    return "n/a" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def markdown(study: dict, out: Path) -> tuple[str, str]:
    """(the whole study.md, its table and notes)."""
    grid, cmp = study["grid"], {(c["regime"], c["arm"]): c for c in study["comparisons"]}
    lines = ["| regime | arm | val macro AUROC (best/, mean) | test macro AUROC mean [95% CI] | n "
             "| delta vs image_only [paired 95% CI] p |", "|---|---|---|---|---|---|"]
    for s in study["summaries"]:
        ci = f" [{_f(s['ci95'][0])}, {_f(s['ci95'][1])}]" if s["ci95"] else ""
        n = f"{s['n_ok']}" + (f" ({s['n_failed']} failed)" if s["n_failed"] else "")
        c = cmp.get((s["regime"], s["arm"]))
        if s["arm"] == BASELINE:
            delta = "(baseline)"
        elif s["reads_report"]:
            delta = "reads the report: the teacher's ceiling, not compared"
        elif c is None or "delta" not in c:
            delta = "not compared" + (f": {c.get('skipped') or c.get('error')}" if c else "")
        elif c["delta"] is None or c["ci"] is None:
            delta = "undefined (a macro label lacks a class)"
        else:
            delta = (f"{_f(c['delta'], True)} [{_f(c['ci'][0], True)}, {_f(c['ci'][1], True)}] "
                     f"p = {c['p_value']:.3g}")
        lines.append(f"| {s['regime']} | {s['arm']} | {_f(s['best_val_macro_auroc_mean'])} | {_f(s['mean'])}{ci} "
                     f"| {n} | {delta} |")
    notes = [f"- {c['regime']} {c['arm']} vs {BASELINE}: not compared: {c.get('skipped') or c.get('error')}"
             for c in study["comparisons"] if "delta" not in c]
    if BASELINE not in grid["arms"]:
        notes.append(f"- no {BASELINE} arm in the grid: nothing compared")
    failed = [c for c in study["cells"].values() if c.get("status") != "ok"]
    notes += [f"- {cell_key(c['regime'], c['arm'], c['seed'])} {c['status']}"
              + (f": {error_line(c.get('error'))}" if c.get("error") else "") for c in failed]
    table = "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")
    base, controls = grid["base"], grid["policy_control"]

    def corpus(k: dict) -> str:
        return ", ".join(f"{knob} {k[knob]:g}" if isinstance(k[knob], float) else f"{knob} {k[knob]}"
                         for knob in BASE_REGIME)

    def arm(a: str) -> str:
        runs = runs_of(grid, grid["arms"][a])
        items = [i for i in grid["arms"][a] if override_key(i, "") not in runs]
        items += [f"{k}=<{source} run, same regime and seed>" for k, source in runs.items()]
        return f"{a}: {' '.join(items) or '(the config as it is)'}" + (" [policy control]" if a in controls else "")

    regimes = "; ".join(f"{name} ({corpus(k)})" for name, k in grid["regimes"].items())
    policy = ", ".join(f"{key} {_policy(setting(grid, [], key))}" for key in POLICY_KEYS)
    ok = sum(c.get("status") == "ok" for c in study["cells"].values())
    seconds = sum(c.get("seconds") or 0 for c in study["cells"].values())
    head = [f"# Study: {out}", "",
            f"- **Regimes** (synthetic corpus, data seed {base['seed']}, {base['num_val']} val / "
            f"{base['num_test']} test studies at {base['image_size']} px; one knob varied at a time around "
            f"{corpus(base)}; label_fraction F: the other 1 - F of the training studies have image and report, no "
            f"labels): {regimes}",
            f"- **Arms** (on {grid['config'] or 'configs/default.yaml'}): {'; '.join(map(arm, grid['arms']))}",
            f"- **Label policy** (training): {policy} in every arm"
            + (f" but the policy controls ({', '.join(controls)})" if controls else ""),
            f"- **Seeds**: train.seed {', '.join(map(str, grid['seeds']))}; **--set**: "
            f"{' '.join(grid['set']) or '(none)'}",
            f"- **Budget**: {budget_text(study['budget'])}, the same for every arm",
            f"- **Cells**: {ok} of {len(cells_of(grid))} done, {len(failed)} not; {seconds / 3600:.2f} h of training "
            "wall time",
            "- **Test macro AUROC**: the final/ model on the regime's test split (RUN/test_metrics.json), mean over "
            "the seeds that finished, 95 % t-interval over seeds (none with one seed).",
            f"- **Delta**: arm minus {BASELINE} on the same test samples, each arm's seeds averaged "
            f"(vkd_dist.compare on {CHECKPOINT}/): 95 % CI and two-sided p from one paired patient bootstrap "
            f"({study.get('bootstrap', 1000)} resamples). It measures the test-sample noise of these seeds' mean; "
            "the seed-to-seed spread is in the t-interval.", ""]
    plots = [f"![{p}]({p})" for p in study.get("plots", [])]
    return "\n".join(head + [table, ""] + plots) + "\n", table


def report(study: dict, out: Path, n_boot: int, force: bool) -> str:
    """Summaries, comparisons, plots and study.md from the cells; returns the table for the terminal."""
    study["summaries"] = summarise(study)
    study["bootstrap"] = n_boot
    study["comparisons"] = comparisons(study, out, n_boot, force)
    title = f"{len(study['grid']['seeds'])} seeds; {budget_text(study['budget'])}"
    study["plots"] = [p for p in (plot_knob(study, out, k, title) for k in PLOTS) if p]
    text, table = markdown(study, out)
    atomic_write_text(out / "study.md", text)
    write_study(out, study)
    return table


# ------------------------------------------------------------------------------------------ the command
def parse_args(argv=None) -> argparse.Namespace:
    from vkd_dist import RawDefaultsHelpFormatter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=RawDefaultsHelpFormatter)
    ap.add_argument("--out", help="study directory (default: runs/study, runs/study-quick with --quick, "
                    "runs/study-evidence with --evidence)")
    ap.add_argument("--config", help="base trainer YAML (default: configs/default.yaml)")
    ap.add_argument("--regimes", help="comma-separated regimes, e.g. n500,noise0.2,contrast0.5,labels0.1 (default: "
                    "the full grid around the base)")
    ap.add_argument("--arms", help=f"comma-separated arms of {','.join(ARMS)} or --arm's (default: "
                    f"{','.join(DEFAULT_ARMS)})")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="define (and add) an arm: overrides on the base config")
    ap.add_argument("--seeds", type=int, help=f"train.seed 0..N-1 (default {SEEDS})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every cell, e.g. train.max_steps=300 (an arm's own keys win)")
    ap.add_argument("--corpus", action="append", default=[], metavar="KEY=VALUE",
                    help="the base corpus: num_train, num_val, num_test, image_size, label_noise, lesion_contrast, "
                    "label_fraction")
    ap.add_argument("--policy-control", action="append", default=[], metavar="ARM",
                    help="an arm that may train under another label policy (data.missing, data.uncertain)")
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the smaller grid QUICK (explicit flags still win)")
    preset.add_argument("--evidence", action="store_true",
                        help="the grid EVIDENCE: label scarcity and the VKD variants (explicit flags still win)")
    ap.add_argument("--bootstrap", type=int, help="paired patient-bootstrap resamples per comparison (default: "
                    "the study's, else 1000)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild study.md, the plots and the comparisons from OUT; no training")
    args = ap.parse_args(argv)
    args.out = Path(args.out or preset_of(args).get("out", "runs/study"))
    return args


def lock(out: Path):
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".study.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StudyError(f"another study is running in {out}; wait for it or use another --out") from None
    return handle


def study_main(args: argparse.Namespace) -> int:
    out, path = args.out, args.out / "study.json"
    held = load_study(path)
    if args.report_only:
        if held is None:
            raise StudyError(f"{path}: no study here to report on")
        with lock(out):
            for cell in held["cells"].values():  # the run directories are the source: re-read what they hold
                if cell.get("status") == "ok":
                    try:
                        cell.update(read_metrics(out / cell["run_dir"]))
                    except (ValueError, OSError) as exc:  # moved or removed: what study.json holds stands
                        print(f"[study] {cell['run_dir']}: {exc}; keeping the recorded metrics", file=sys.stderr)
            if "budget" not in held:
                held.update(resolve(held["grid"], out))
            print(report(held, out, args.bootstrap or held.get("bootstrap") or 1000, force=True))
        return 0
    grid = build_grid(args)
    if held is not None:
        diff = grid_difference(held["grid"], grid)
        if diff:
            raise StudyError(f"{path} holds another grid: {'; '.join(diff)}; start another --out")
    with lock(out):
        study = held or {"format": 1, "grid": grid, "cells": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **provenance()}
        if "budget" not in study:  # the grid fixes it: once per study
            study.update(resolve(grid, out))
        print(f"[study] {out}: {len(grid['regimes'])} regimes x {len(grid['arms'])} arms x {len(grid['seeds'])} "
              f"seeds = {len(cells_of(grid))} cells; {budget_text(study['budget'])}, the same for every arm",
              flush=True)
        write_study(out, study)
        build_corpora(grid, out)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            finished = run_cells(grid, out, study)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if not finished:
            return 130
        print(report(study, out, args.bootstrap or study.get("bootstrap") or 1000, force=False))
        failed = [k for k, c in study["cells"].items() if c["status"] != "ok"]
        if failed:
            print(f"[study] {len(failed)} cell(s) failed ({', '.join(failed)}); the same command retries them",
                  file=sys.stderr)
            return 1
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the comparisons load tokenizers in this process
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        return study_main(args)
    except StudyError as exc:
        print(f"study: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
