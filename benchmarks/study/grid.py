"""The study's grid: the regimes, arms and presets; parsing them from the command line; building the grid,
checking it (one label policy, the budget, the study's own keys) and naming how it differs from a study's; the
cells it holds and what each one's config says (overrides, budget, objectives)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

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
    # the validation pilot's best VKD (docs/evidence.md): vkd_reg_init's KL at beta 0.1, a separate image
    # classifier, and the report path's predictive as the image path's target on every study (weight 4)
    "vkd_distil": [*REG, "objective.text_init=@text_only", "model.image_head=separate",
                   "objective.predictive_weight=4.0"],
    "labeller": ["objective.name=image_only"],  # on the regime's corpus relabelled off every report (RELABELLED)
    # The arms a user with unlabelled reports would pick instead. Distillation on the unlabelled studies only;
    # pseudo-labels: the text_only teacher's probabilities as soft labels there (T 1, alpha 1), true labels elsewhere.
    "kd_u": ["objective.name=kd", "objective.distil_on=unlabelled"],
    "pseudo": ["objective.name=kd", "objective.distil_on=unlabelled", "objective.kd_temperature=1",
               "objective.kd_alpha=1"],
    "vkd_distil_u": [*REG, "objective.text_init=@text_only", "model.image_head=separate",
                     "objective.predictive_weight=4.0", "objective.distil_on=unlabelled"],
    # Contrastive pre-training on every pair (its own scores are chance: its classifier is never trained), then
    # fine-tuning or a linear probe on the labelled studies: two runs, the budget of text_only plus a student.
    "contrastive_pre": ["objective.name=contrastive"],
    "contrastive": ["objective.name=image_only", "model.init_from=@contrastive_pre"],
    "contrastive_probe": ["objective.name=image_only", "model.init_from=@contrastive_pre", "model.freeze_image=true"],
}
# What the tuning pilot (benchmarks/study/tune.py) searches for each arm it tunes: the keys the arm is sensitive to.
LR = {"optim.lr": [2e-4, 5e-4, 1e-3, 2e-3], "optim.weight_decay": [0.0, 0.05, 0.2]}
SHARE = {"data.labelled_share": [0.25, 0.5, 0.75]}  # objectives that read unlabelled studies too
SPACES: dict[str, dict[str, list]] = {
    "image_only": LR,
    "labeller": LR,
    "kd": {**LR, **SHARE, "objective.kd_temperature": [1, 2, 4], "objective.kd_alpha": [0.25, 0.5, 0.75],
           "objective.distil_on": ["all", "unlabelled"]},
    "kd_u": {**LR, **SHARE, "objective.kd_temperature": [1, 2, 4], "objective.kd_alpha": [0.25, 0.5, 0.75]},
    "pseudo": {**LR, **SHARE},
    "contrastive": {**LR, "model.freeze_image": [False, True]},
    "vkd": {**LR, **SHARE, "objective.beta": [0.03, 0.1, 0.3, 1.0],
            "objective.prior_bce_weight": [0.5, 1.0, 2.0]},
    "vkd_distil": {**LR, **SHARE, "objective.beta": [0.03, 0.1, 0.3],
                   "objective.predictive_weight": [1.0, 2.0, 4.0, 8.0], "objective.distil_on": ["all", "unlabelled"]},
}
SPACES["vkd_distil_u"] = {k: v for k, v in SPACES["vkd_distil"].items() if k != "objective.distil_on"}
RELABELLED = ("labeller",)  # arms reading DATA/<regime>-labeller: `vkd-data label` of the train split
TRIAL = re.compile(r"(.+)\.t\d+")  # a tuning trial of an arm (benchmarks/study/tune.py): ARM.t<K>
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
TESTBED_KNOBS = ("miss_rate", "false_rate", "hedge_rate", "gold_fraction")  # --corpus; used by testbed<F> regimes
# --quick (explicit flags still win): the faint-lesion regime, the default against its baseline, 3 seeds, half the
# default's steps: 6 cells, ~15 minutes on 2 CPU cores (docs/evidence.md)
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
OWNED = ("run_dir", "resume", "train.seed", "data.path", "data.synthetic")  # the study sets these per cell
AGREED = {"data.build_synthetic": False}  # also set per cell; a --set that says the same is harmless
BUDGET_KEYS = ("train.max_steps", "data.batch_size", "optim.grad_accum")  # the same for every arm


class StudyError(Exception):
    """A problem with the command line or OUT: one line, exit 2."""


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
    if knob in TESTBED_KNOBS:
        from vkd_dist.data.testbed import ObservationParams

        try:
            ObservationParams(**{knob: value})
        except ValueError as exc:
            raise StudyError(f"{where}: {exc}") from None
    return value


def parse_regime(name: str, base: dict) -> tuple[str, dict]:
    """`n500` / `noise0.2` / `contrast0.25` / `labels0.1` -> (the name as the study writes it, the base corpus with
    that knob set); `testbed0.1`: the observation testbed (vkd_dist/data/testbed.py, its default rates) with that
    labelled fraction."""
    if name.startswith("testbed"):
        value = knob_value("label_fraction", name[len("testbed"):], f"regime {name} (testbed<labelled fraction>)")
        return f"testbed{value:g}", {**base, "label_fraction": value, "testbed": True}
    for prefix, knob in PREFIX.items():  # "noise" before "n"
        if name.startswith(prefix):
            value = knob_value(knob, name[len(prefix):], f"regime {name} ({prefix}<{knob}>)")
            return regime_name(knob, value), {**base, knob: value}
    raise StudyError(f"regime {name!r}: expected n<train size>, noise<label noise>, contrast<lesion contrast>, "
                     "labels<labelled fraction> or testbed<labelled fraction>, e.g. n500, noise0.2, contrast0.5, "
                     "labels0.1, testbed0.1")


def default_regimes(base: dict) -> list[str]:
    """The base and one regime per other value of each varied knob."""
    names = [regime_name("num_train", v) for v in sorted({*VARIED["num_train"], base["num_train"]})]
    for knob in ("label_noise", "lesion_contrast"):
        names += [regime_name(knob, v) for v in VARIED[knob] if v != base[knob]]
    return names


def parse_corpus(items: list[str]) -> dict:
    base = {**BASE_REGIME, **CORPUS}
    allowed = [k for k in base if k != "seed"] + list(TESTBED_KNOBS)
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
        raise StudyError(f"--arm {name}: a built-in arm (ARMS in benchmarks/study/grid.py); choose another name")
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


def load_tuned(path: str) -> dict:
    """OUT/tuned.json of a finished tuning pilot (benchmarks/study/tune.py)."""
    try:
        tuned = json.loads(Path(path).read_text())
    except OSError as exc:
        raise StudyError(f"--tuned {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise StudyError(f"--tuned {path}: not JSON ({exc})") from None
    shapes = {"arms": dict, "seeds": list, "regime": str}
    wrong = [k for k, kind in shapes.items() if not isinstance(tuned, dict) or not isinstance(tuned.get(k), kind)]
    if wrong or not all(isinstance(t, dict) and isinstance(t.get("best"), (dict, type(None)))
                        for t in tuned["arms"].values()):
        raise StudyError(f"--tuned {path}: not a tuning result ({'no ' + wrong[0] if wrong else 'an arm without best'}"
                         "); it is OUT/tuned.json of `python -m benchmarks.study.tune`")
    unfinished = [a for a, t in tuned["arms"].items() if not t.get("complete")]
    if unfinished:
        raise StudyError(f"--tuned {path}: the pilot of {', '.join(unfinished)} has not finished every trial; "
                         "run its command again") from None
    return tuned


def apply_tuned(tuned: dict, known: dict, seeds: list, path: str) -> dict:
    """Each tuned arm's overrides with its best trial's appended (they win); the pilot's seeds (and so its labelled
    subsets) may not be the table's."""
    shared = sorted(set(tuned["seeds"]) & set(seeds))
    if shared:
        raise StudyError(f"--tuned {path}: the pilot trained seed {shared[0]} (and its labelled subset), which this "
                         "study would score again; tuning never sees the final table's seeds: use --first-seed or "
                         "another pilot seed")
    return {name: [*overrides, *tuned["arms"][name]["best"]["overrides"]] if name in tuned["arms"] else overrides
            for name, overrides in known.items()}


def check_all_tuned(tuned: dict, names: list[str], path: str) -> None:
    """Every arm of the table that has a search space was tuned: one tuned and one untuned arm are not compared."""
    untuned = [a for a in names if a in SPACES and a not in tuned["arms"]]
    if untuned:
        raise StudyError(f"--tuned {path}: arm {untuned[0]} has a search space (SPACES) but the pilot did not tune "
                         "it; every competing arm gets the same tuning budget: tune it too, or leave it out")


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
    seeds, first = args.seeds if args.seeds is not None else preset.get("seeds", SEEDS), getattr(args, "first_seed", 0)
    if seeds < 1 or first < 0:
        raise StudyError("--seeds must be at least 1" if seeds < 1 else "--first-seed must be 0 or more")
    tuned = load_tuned(args.tuned) if getattr(args, "tuned", None) else None
    grid: dict[str, Any] = {"config": args.config, "config_yaml": config_layers(args.config), "base": base,
                            "regimes": {}, "arms": {}, "seeds": list(range(first, first + seeds)), "set": settings,
                            "label_subsets": "per_seed"}
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

    if tuned is not None:
        pilot = {"config_yaml": config_layers(tuned.get("config")), "set": tuned.get("set", [])}
        for key in BUDGET_KEYS:  # a setting tuned at another budget is not the same setting
            if setting(pilot, [], key) != setting(grid, [], key):
                raise StudyError(f"--tuned {args.tuned}: the pilot trained at {key}={setting(pilot, [], key)}, this "
                                 f"study at {setting(grid, [], key)}; tune at the table's budget")
        check_all_tuned(tuned, names, args.tuned)
        known = apply_tuned(tuned, known, grid["seeds"], args.tuned)
        grid["tuned"] = {"from": str(args.tuned), "regime": tuned["regime"], "seeds": tuned["seeds"],
                         "arms": {a: t["best"]["overrides"] for a, t in tuned["arms"].items() if a in known}}
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


def base_arm(arm: str) -> str:
    """The arm a tuning trial ARM.t<K> is a setting of; any other arm is its own."""
    trial = TRIAL.fullmatch(arm)
    return trial.group(1) if trial else arm


def per_seed_subset(grid: dict, regime: str) -> bool:
    """Whether each seed of the regime trains on its own labelled subset (label_seed = the seed): where some
    training studies lose their labels (or get the truth) and the study draws subsets per seed (studies from before
    per-seed subsets share data seed 0's)."""
    knobs = grid["regimes"][regime]
    partial = knobs["label_fraction"] < 1 or (knobs.get("testbed") and knobs.get("gold_fraction", 0) > 0)
    return bool(partial) and grid.get("label_subsets") == "per_seed"


def corpus_path(out: Path, regime: str, arm: Optional[str] = None, seed: Optional[int] = None,
                grid: Optional[dict] = None) -> Path:
    """DATA/<regime>; DATA/<regime>-subset<seed> where each seed has its own labelled subset; DATA/<regime>-labeller
    for a relabelled arm (every training report labelled: the same for every subset)."""
    if arm is not None and base_arm(arm) in RELABELLED:
        return out / "data" / f"{regime}-labeller"
    if grid is not None and seed is not None and per_seed_subset(grid, regime):
        return out / "data" / f"{regime}-subset{seed}"
    return out / "data" / regime


def corpus_knobs(grid: dict, regime: str, seed: int) -> dict:
    """The regime's corpus knobs for this seed's cells (its label_seed where subsets are per seed)."""
    knobs = dict(grid["regimes"][regime])
    return {**knobs, "label_seed": seed} if per_seed_subset(grid, regime) else knobs


def cell_overrides(grid: dict, out: Path, regime: str, arm: str, seed: int) -> list[str]:
    """--set, then the arm's own keys (they win), then the study's per-cell keys."""
    runs = runs_of(grid, grid["arms"][arm])
    own = [i for i in [*grid["set"], *grid["arms"][arm]] if override_key(i, "") not in runs]  # KEY=@ARM: below
    return [*own, f"data.path={corpus_path(out, regime, arm, seed, grid).resolve()}", "data.build_synthetic=false",
            *(f"data.synthetic.{k}={v}" for k, v in corpus_knobs(grid, regime, seed).items()), f"train.seed={seed}",
            f"run_dir={(out / run_rel(regime, arm, seed)).resolve()}", "resume=latest",
            *(f"{key}={(out / run_rel(regime, source, seed)).resolve()}" for key, source in runs.items())]


def resolve(grid: dict, out: Path) -> dict:
    """What the cells' configs say, once per study: the per-cell budget (from the base config and --set: arms may
    not change it) and each arm's objective, and whether it reads the report at inference."""
    from vkd_dist.configure import ConfigError, load_config
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

