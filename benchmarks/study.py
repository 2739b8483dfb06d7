"""A study: objectives ("arms") x seeds x data regimes, every cell a real training run, with honest error bars.

    python -m benchmarks.study                               # the full grid, 150 cells, into runs/study
    python -m benchmarks.study --quick                       # QUICK below, into runs/study-quick
    python -m benchmarks.study --regimes n500,n2000 --arms vkd,image_only --seeds 3 --set train.max_steps=300
    python -m benchmarks.study --arm beta1=objective.beta=1.0,objective.beta_schedule=constant --arms image_only
    python -m benchmarks.study --report-only --out runs/study  # study.md, plots, comparisons again; no training

Grid. Regimes are settings of the synthetic corpus (vkd_dist/data/synthetic.py), one factor varied at a time
around a base (BASE_REGIME, CORPUS): `n<N>` sets num_train, `noise<p>` label_noise, `contrast<c>`
lesion_contrast, the other knobs staying at the base (`--corpus key=value` moves the base or the split sizes).
The full grid is n500, n2000 (the base), n8000, noise0.2, contrast0.5, contrast0.25, with 400 validation and
1,000 test studies each and data seed 0, so every arm and seed of a regime is scored on the same test samples
(the comparisons are paired). Each regime's corpus is built once into OUT/data/<regime>. Arms are the ARMS
table: key=value overrides on the base config (configs/default.yaml, or --config); `kd` distils from the
`text_only` run of the same regime and seed, which the study adds to the grid when kd is asked for. Seeds are
train.seed=0..N-1.

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
grid varies them, auroc_vs_label_noise.png and auroc_vs_lesion_contrast.png. Each image-inference arm is
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
from vkd_dist.fileio import atomic_write_text  # noqa: E402

# ------------------------------------------------------------------------------------------------ the grid
ARMS: dict[str, list[str]] = {  # name -> key=value overrides on the base config
    "vkd": [],  # the embedded default
    "vkd_paper": ["objective.prior_bce_weight=0", "objective.beta=1.0", "objective.beta_schedule=constant",
                  "model.text_encoder=minilm", "model.freeze_text=true"],  # the paper's objective, frozen MiniLM
    "image_only": ["objective.name=image_only"],
    "text_only": ["objective.name=text_only"],
    "kd": ["objective.name=kd"],  # + objective.kd_teacher: the text_only run of the same regime and seed
}
BASELINE = "image_only"  # what every image-inference arm is compared with
TEACHER_ARM = {"kd": "text_only"}  # objective -> the arm whose run (same regime, seed) is its objective.kd_teacher
BASE_REGIME = {"num_train": 2000, "label_noise": 0.05, "lesion_contrast": 1.0}
VARIED: dict[str, list[Any]] = {"num_train": [500, 2000, 8000], "label_noise": [0.05, 0.2],
                                "lesion_contrast": [1.0, 0.5, 0.25]}
CORPUS = {"num_val": 400, "num_test": 1000, "image_size": 128, "seed": 0}  # every regime
PREFIX = {"noise": "label_noise", "contrast": "lesion_contrast", "n": "num_train"}  # regime name -> knob
SEEDS = 5
# --quick (explicit flags still win): the faint-lesion regime, the default against its baseline, 3 seeds, half the
# default's steps: 6 cells, ~15 minutes on 2 CPU cores (README "Evidence")
QUICK: dict[str, Any] = {
    "regimes": ["contrast0.5"], "arms": ["vkd", "image_only"], "seeds": 3,
    "set": ["train.max_steps=300", "train.eval_every=300", "train.ckpt_every=300"], "out": "runs/study-quick",
}
CHECKPOINT = "final"  # the model test_metrics.json describes; the comparisons use the same one
OWNED = ("run_dir", "resume", "train.seed", "data.path", "data.synthetic")  # the study sets these per cell
AGREED = {"data.build_synthetic": False}  # also set per cell; a --set that says the same is harmless
BUDGET_KEYS = ("train.max_steps", "data.batch_size", "optim.grad_accum")  # the same for every arm
PLOTS = {"num_train": ("auroc_vs_train_size.png", "training-set size (studies)"),
         "label_noise": ("auroc_vs_label_noise.png", "label noise (fraction of findings the image does not show)"),
         "lesion_contrast": ("auroc_vs_lesion_contrast.png", "lesion contrast")}
TAIL_LINES = 20  # of a failed cell's log, kept as its error


class StudyError(Exception):
    """A problem with the command line or OUT: one line, exit 2."""


class Interrupted(Exception):
    """SIGTERM to the study: the running cell is stopped with a checkpoint, to be resumed by the next run."""


# ------------------------------------------------------------------------------------------ building the grid
def regime_name(knob: str, value: float) -> str:
    prefix = next(p for p, k in PREFIX.items() if k == knob)
    return f"{prefix}{value:g}"


def parse_regime(name: str, base: dict) -> tuple[str, dict]:
    """`n500` / `noise0.2` / `contrast0.25` -> (the name as the study writes it, the base corpus with that knob set)."""
    for prefix, knob in PREFIX.items():  # "noise" before "n"
        m = re.fullmatch(rf"{prefix}(\d+(?:\.\d*)?)", name)
        if m:
            value = float(m.group(1))
            if knob == "num_train":
                if not value.is_integer() or value < 1:
                    raise StudyError(f"regime {name}: the training-set size must be a positive integer")
                value = int(value)
            return regime_name(knob, value), {**base, knob: value}
    raise StudyError(f"regime {name!r}: expected n<train size>, noise<label noise> or contrast<lesion contrast>, "
                     "e.g. n500, noise0.2, contrast0.5")


def default_regimes(base: dict) -> list[str]:
    """The base and one regime per other value of each varied knob."""
    names = [regime_name("num_train", v) for v in sorted({*VARIED["num_train"], base["num_train"]})]
    for knob in ("label_noise", "lesion_contrast"):
        names += [regime_name(knob, v) for v in VARIED[knob] if v != base[knob]]
    return names


def parse_corpus(items: list[str]) -> dict:
    base = {**BASE_REGIME, **CORPUS}
    allowed = ("num_train", "num_val", "num_test", "image_size", "label_noise", "lesion_contrast")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in allowed:
            raise StudyError(f"--corpus {item}: expected KEY=VALUE with KEY one of {', '.join(allowed)}")
        key = key.strip()
        try:
            base[key] = int(value) if key in ("num_train", "num_val", "num_test", "image_size") else float(value)
        except ValueError:
            raise StudyError(f"--corpus {item}: not a number") from None
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


def arm_objective(grid: dict, arm: str) -> str:
    name = "vkd"
    for layer in grid["config_yaml"]:
        name = ((layer or {}).get("objective") or {}).get("name", name)
    for item in [*grid["set"], *grid["arms"][arm]]:
        key, _, value = item.partition("=")
        if key.strip() in ("objective", "objective.name"):
            name = str(yaml.safe_load(value))
    return name


def teacher_of(grid: dict, arm: str) -> Optional[str]:
    """The arm whose run of the same regime and seed an arm distils from (objective.kd_teacher), if any."""
    own = [override_key(i, "") for i in [*grid["set"], *grid["arms"][arm]]]
    return None if "objective.kd_teacher" in own else TEACHER_ARM.get(arm_objective(grid, arm))


def build_grid(args: argparse.Namespace) -> dict:
    quick = QUICK if args.quick else {}
    base = parse_corpus([*quick.get("corpus", []), *args.corpus])
    regimes = args.regimes.split(",") if args.regimes else quick.get("regimes") or default_regimes(base)
    custom = dict(parse_arm(spec) for spec in args.arm)
    known = {**ARMS, **custom}
    names = [n.strip() for n in args.arms.split(",") if n.strip()] if args.arms else list(quick.get("arms") or ARMS)
    names += [n for n in custom if n not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StudyError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(known)}; define one with --arm)")
    settings = [*quick.get("set", []), *args.set]
    check_overrides(settings, "--set", arm=False)
    seeds = args.seeds if args.seeds is not None else quick.get("seeds", SEEDS)
    if seeds < 1:
        raise StudyError("--seeds must be at least 1")
    grid: dict[str, Any] = {
        "config": args.config, "config_yaml": config_layers(args.config), "base": base,
        "regimes": dict(parse_regime(name.strip(), base) for name in regimes if name.strip()),
        "arms": {}, "seeds": list(range(seeds)), "set": settings}
    if not grid["regimes"] or not names:
        raise StudyError("the grid is empty: give at least one regime and one arm")
    for name in dict.fromkeys(names):  # a teacher runs before the arms that distil from it
        grid["arms"][name] = known[name]
        teacher = teacher_of(grid, name)
        if teacher and teacher not in grid["arms"]:
            del grid["arms"][name]
            grid["arms"][teacher] = known[teacher]
            grid["arms"][name] = known[name]
            if teacher not in names:
                print(f"[study] arm {name} distils from {teacher}'s run of the same regime and seed: {teacher} added",
                      file=sys.stderr)
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
    knobs = grid["regimes"][regime]
    items = [*grid["set"], *grid["arms"][arm], f"data.path={(out / 'data' / regime).resolve()}",
             "data.build_synthetic=false", *(f"data.synthetic.{k}={v}" for k, v in knobs.items()),
             f"train.seed={seed}", f"run_dir={(out / run_rel(regime, arm, seed)).resolve()}", "resume=latest"]
    teacher = teacher_of(grid, arm)
    if teacher:
        items.append(f"objective.kd_teacher={(out / run_rel(regime, teacher, seed)).resolve()}")
    return items


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
        objective = arm_objective(grid, arm)
        try:
            report = get_objective(objective).inference == TEXT
        except KeyError:  # an unknown objective: its cells fail with the trainer's message
            report = False
        arms[arm] = {"objective": objective, "reads_report": report, "teacher": teacher_of(grid, arm)}
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
                        label_noise=knobs["label_noise"], progress=False)
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
        study["grid"]["arms"]
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
        teacher = teacher_of(grid, arm)
        if teacher and study["cells"].get(cell_key(regime, teacher, seed), {}).get("status") != "ok":
            cell.update(status="failed", exit_code=None, seconds=0.0,
                        error=f"its teacher {cell_key(regime, teacher, seed)} has no finished run")
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
    base = grid["base"]
    regimes = "; ".join(f"{name} (num_train {k['num_train']}, label_noise {k['label_noise']:g}, lesion_contrast "
                        f"{k['lesion_contrast']:g})" for name, k in grid["regimes"].items())
    arms = "; ".join(f"{a}: {' '.join(ov) or '(the config as it is)'}" + (
        f" + objective.kd_teacher=<{teacher_of(grid, a)} run, same regime and seed>" if teacher_of(grid, a) else "")
        for a, ov in grid["arms"].items())
    ok = sum(c.get("status") == "ok" for c in study["cells"].values())
    seconds = sum(c.get("seconds") or 0 for c in study["cells"].values())
    head = [f"# Study: {out}", "",
            f"- **Regimes** (synthetic corpus, data seed {base['seed']}, {base['num_val']} val / "
            f"{base['num_test']} test studies at {base['image_size']} px; one knob varied at a time around "
            f"num_train {base['num_train']}, "
            f"label_noise {base['label_noise']:g}, lesion_contrast {base['lesion_contrast']:g}): {regimes}",
            f"- **Arms** (on {grid['config'] or 'configs/default.yaml'}): {arms}",
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


def plot_knob(study: dict, out: Path, knob: str) -> Optional[str]:
    """Test macro AUROC against one knob (regimes where only it moves off the base), a line and band per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid, base = study["grid"], study["grid"]["base"]
    points = sorted((k[knob], name) for name, k in grid["regimes"].items()
                    if all(k[o] == base[o] for o in ("num_train", "label_noise", "lesion_contrast") if o != knob))
    if not points or (knob != "num_train" and len({x for x, _ in points}) < 2):
        return None
    rows = {(s["regime"], s["arm"]): s for s in study["summaries"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in grid["arms"]:
        got = [(x, rows[(name, arm)]) for x, name in points if rows[(name, arm)]["mean"] is not None]
        if not got:
            continue
        xs = np.array([x for x, _ in got], dtype=float)
        report = got[0][1]["reads_report"]
        (line,) = ax.plot(xs, [s["mean"] for _, s in got], marker="o", linestyle="--" if report else "-",
                          label=f"{arm} (reads the report)" if report else arm)
        lo = np.array([s["ci95"][0] if s["ci95"] else np.nan for _, s in got])
        hi = np.array([s["ci95"][1] if s["ci95"] else np.nan for _, s in got])
        if len(xs) > 1:
            ax.fill_between(xs, lo, hi, where=~np.isnan(lo), color=line.get_color(), alpha=0.2, linewidth=0)
        elif not np.isnan(lo[0]):  # one point: no band to shade
            ax.errorbar(xs, [got[0][1]["mean"]], yerr=[[got[0][1]["mean"] - lo[0]], [hi[0] - got[0][1]["mean"]]],
                        color=line.get_color(), capsize=4)
    if knob == "num_train":
        ax.set_xscale("log")
        ax.set_xticks([x for x, _ in points], [f"{x:g}" for x, _ in points])
        ax.minorticks_off()
    ax.set_xlabel(PLOTS[knob][1])
    ax.set_ylabel("test macro AUROC (mean, 95 % CI over seeds)")
    ax.set_title(f"{len(grid['seeds'])} seeds; {budget_text(study['budget'])}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[knob][0], dpi=110)
    plt.close(fig)
    return PLOTS[knob][0]


def report(study: dict, out: Path, n_boot: int, force: bool) -> str:
    """Summaries, comparisons, plots and study.md from the cells; returns the table for the terminal."""
    study["summaries"] = summarise(study)
    study["bootstrap"] = n_boot
    study["comparisons"] = comparisons(study, out, n_boot, force)
    study["plots"] = [p for p in (plot_knob(study, out, k) for k in PLOTS) if p]
    text, table = markdown(study, out)
    atomic_write_text(out / "study.md", text)
    write_study(out, study)
    return table


# ------------------------------------------------------------------------------------------ the command
def parse_args(argv=None) -> argparse.Namespace:
    from vkd_dist import RawDefaultsHelpFormatter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=RawDefaultsHelpFormatter)
    ap.add_argument("--out", help="study directory (default: runs/study, or runs/study-quick with --quick)")
    ap.add_argument("--config", help="base trainer YAML (default: configs/default.yaml)")
    ap.add_argument("--regimes", help="comma-separated regimes, e.g. n500,noise0.2,contrast0.5 (default: the full "
                    "grid around the base)")
    ap.add_argument("--arms", help=f"comma-separated arms (default: {','.join(ARMS)})")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="define (and add) an arm: overrides on the base config")
    ap.add_argument("--seeds", type=int, help=f"train.seed 0..N-1 (default {SEEDS})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every cell, e.g. train.max_steps=300 (an arm's own keys win)")
    ap.add_argument("--corpus", action="append", default=[], metavar="KEY=VALUE",
                    help="the base corpus: num_train, num_val, num_test, image_size, label_noise, lesion_contrast")
    ap.add_argument("--quick", action="store_true", help="the smaller grid QUICK (explicit flags still win)")
    ap.add_argument("--bootstrap", type=int, help="paired patient-bootstrap resamples per comparison (default: "
                    "the study's, else 1000)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild study.md, the plots and the comparisons from OUT; no training")
    args = ap.parse_args(argv)
    args.out = Path(args.out or (QUICK["out"] if args.quick else "runs/study"))
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
