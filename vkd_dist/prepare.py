"""What a run needs before its first step: the data set (building the synthetic default if asked), the
tokenizer and the training reports' token ids. Rank 0 does the work; the other ranks wait and then read the
result. The checks that need the data set or the run directory (split names, empty splits, a resume onto
another model shape) are here too, each before the work it guards."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from vkd_dist import checkpoint
from vkd_dist.config import Config, ConfigError, did_you_mean, no_dataset, save_config, to_dict
from vkd_dist.data.compose import labelled_per_batch
from vkd_dist.data.schema import DatasetInfo, read_dataset
from vkd_dist.data.tokens import TokenTable, build_token_table, build_wordpiece_tokenizer, load_tokenizer, report_texts
from vkd_dist.fileio import atomic_write_text
from vkd_dist.objectives import get_objective
from vkd_dist.run_dir import RunDir


@dataclass
class Prepared:
    """What `prepare_run` made ready: the data set, the tokenizer, the training split's token table (None when
    not asked for or off) and lines for the run's log (said after its header)."""

    info: DatasetInfo
    tokenizer: Any
    tokens: Optional[TokenTable] = None
    notes: list = field(default_factory=list)


def prepare_run(cfg: Config, accelerator=None, tokens: bool = True, resumed: Optional[Path] = None) -> Prepared:
    """Everything a run needs from its data and its run directory before a model is built, in the order the
    checks guard the work: a resume onto another model shape is refused before anything is read or written; the
    kd teacher's text features are adopted before config.yaml records them; the data set (built if asked),
    labels.json (a resume onto other labels refused), config.yaml, the tokenizer and, with `tokens`, the training
    split's token table. `resumed`: the checkpoint the run resumes from (vkd_dist/resume.py decided it)."""
    check_resume_config(cfg, resumed)
    notes = [adopted] if (adopted := adopt_teacher_text_features(cfg)) else []
    info = ensure_dataset(cfg, accelerator)
    # a share that leaves no labelled study per batch matters only where some studies are unlabelled
    labelled_per_batch(get_objective(cfg.objective.name).learns_from, cfg.data,
                       info.num_unlabelled(cfg.data.train_split))
    record_run_labels(cfg, info, accelerator)  # before config.yaml: a refused resume leaves the run as it was
    if accelerator is None or accelerator.is_main_process:
        # overwrite is never saved: a rerun must not overwrite
        save_config(replace(with_absolute_paths(cfg), overwrite=False), RunDir(cfg.run_dir).config_file)
    tokenizer = resolve_tokenizer(cfg, info, accelerator)
    table = token_table(cfg, info, tokenizer, accelerator) if tokens else None
    warn_unscorable(info, cfg.data.val_split, notes.append)
    return Prepared(info, tokenizer, table, notes)


# Paths a finished run is read by again (vkd-eval, vkd-export, a kd student, text_init): recorded absolute in its
# config.yaml, so that the run can be read from any directory.
RECORDED_PATHS = ("data.path", "data.text_features", "objective.kd_teacher", "objective.text_init", "model.tokenizer")


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose RECORDED_PATHS are absolute: data.path always (it is a directory, here or to be
    built), the others when they name something that exists (model.tokenizer may be a hub name)."""
    out = copy.deepcopy(cfg)
    for key in RECORDED_PATHS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if value and (key == "data.path" or Path(value).expanduser().exists()):
            setattr(getattr(out, section), name, str(Path(value).expanduser().resolve()))
    return out


def _main_process_first(accelerator) -> contextlib.AbstractContextManager:
    """Rank 0 runs the block, then the others do (finding what it built); a plain block without an accelerator."""
    return accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()


def ensure_dataset(cfg: Config, accelerator=None) -> DatasetInfo:
    path = Path(cfg.data.path)
    with _main_process_first(accelerator):
        if not (path / "dataset.json").is_file():
            if not cfg.data.build_synthetic:  # validated already; gone since
                raise no_dataset(cfg.data.path)
            from vkd_dist.data.testbed import build_corpus, rates_line

            s = cfg.data.synthetic
            kind = "testbed" if s.testbed else "synthetic corpus"
            print(f"building the {kind} at {path} ({s.num_train}/{s.num_val}/{s.num_test} samples)", flush=True)
            meta = build_corpus(path, to_dict(s))
            if s.testbed:
                print(rates_line(meta), flush=True)
    try:
        info = read_dataset(path)
    except (FileNotFoundError, ValueError) as exc:  # e.g. another schema version: one line, as vkd-train prints
        raise ConfigError(str(exc)) from exc
    check_splits(cfg, info)
    return info


SPLIT_KEYS = ("train_split", "val_split", "test_split")


def check_split_name(given: str, split: str, info: DatasetInfo) -> None:
    """`given` (how the user wrote it: a config key or a flag) names a split of the data set."""
    splits = list(info.meta["splits"])
    if split not in splits:
        raise ConfigError(f"{given} is not a split of {info.root / 'dataset.json'} "
                          f"(has: {', '.join(splits)}{did_you_mean(split, splits)})")


def check_splits(cfg: Config, info: DatasetInfo) -> None:
    """data.*_split name splits of the data set, and those the run reads have samples (test only with
    train.test_at_end). Known only once dataset.json is there: checked before any tokenizer or model is built."""
    for key in SPLIT_KEYS:
        split = getattr(cfg.data, key)
        check_split_name(f"data.{key}={split!r}", split, info)
        if (key != "test_split" or cfg.train.test_at_end) and info.num_samples(split) == 0:
            raise ConfigError(f"data.{key}={split!r}: split {split!r} of {info.root} has 0 samples")


def teacher_run_dir(cfg: Config) -> RunDir:
    """objective.kd_teacher names a text_only run directory or a checkpoint inside one."""
    if not cfg.objective.kd_teacher:
        raise ConfigError(f"objective {cfg.objective.name} needs objective.kd_teacher (a text_only run directory)")
    path = Path(cfg.objective.kd_teacher)
    return RunDir.containing(path, levels=1) or RunDir(path.parent)


def adopt_teacher_text_features(cfg: Config) -> Optional[str]:
    """A teacher trained on precomputed text features (vkd-data embed-text) has no text encoder: the student's
    batches must carry the same features. Sets data.text_features from the teacher's config when the student
    names none, and returns a line saying so (None when nothing changed)."""
    if not get_objective(cfg.objective.name).needs_teacher or cfg.data.text_features:
        return None
    teacher = teacher_run_dir(cfg)
    features = teacher.config().data.text_features
    if not features:
        return None
    if not Path(features).exists():
        raise ConfigError(f"objective.kd_teacher={cfg.objective.kd_teacher}: the teacher was trained on "
                          f"data.text_features={features}, which is gone; make it again with vkd-data embed-text "
                          "or pass data.text_features=PATH")
    cfg.data.text_features = features
    return f"data.text_features={features}: the kd teacher's precomputed report features (from {teacher.config_file})"


def tokenizer_dir(cfg: Config, run_dir: str | Path) -> Path:
    """Where a run's tokenizer lives: the kd teacher's (its batches feed the teacher) > the objective.text_init
    run's (its text encoder was trained on those token ids) > model.tokenizer > the text encoder's own directory
    (for a short name, its package's) > RUN/tokenizer (built from the training reports by `resolve_tokenizer`)."""
    if get_objective(cfg.objective.name).needs_teacher:
        teacher = teacher_run_dir(cfg).tokenizer_dir
        if (teacher / "tokenizer.json").is_file():
            return teacher
    from vkd_dist.init_from import init_tokenizer_run
    from vkd_dist.text_init import text_init_run

    init_run = text_init_run(cfg) if cfg.objective.text_init else init_tokenizer_run(cfg)
    if init_run is not None:  # its text encoder was trained on that run's token ids
        return tokenizer_dir(RunDir(init_run).config(), init_run)
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    if cfg.model.text_encoder != "tiny-bert":  # a local directory, or a short name's package dir (minilm)
        from vkd_dist.models.pretrained import text_encoder_dir

        return Path(text_encoder_dir(cfg.model.text_encoder))
    return RunDir(run_dir).tokenizer_dir


def resolve_tokenizer(cfg: Config, info: DatasetInfo, accelerator=None):
    """The run's tokenizer (see `tokenizer_dir`), building RUN/tokenizer on rank 0 the first time."""
    path = tokenizer_dir(cfg, cfg.run_dir)
    if path == RunDir(cfg.run_dir).tokenizer_dir:
        with _main_process_first(accelerator):
            if not (path / "tokenizer.json").is_file():
                build_wordpiece_tokenizer(report_texts(info.shards(cfg.data.train_split)), cfg.model.vocab_size, path)
    return load_tokenizer(path)


def token_table(cfg: Config, info: DatasetInfo, tokenizer, accelerator=None) -> Optional[TokenTable]:
    """The training split's TokenTable in RUN/tokens (built on rank 0 the first time), or None when
    data.pretokenize is off or the tokenizer has no fast backend."""
    if not cfg.data.pretokenize:
        return None
    split = cfg.data.train_split
    with _main_process_first(accelerator):  # the others find rank 0's table by its fingerprint
        return build_token_table(RunDir(cfg.run_dir).tokens_dir, split, info.shards(split), tokenizer,
                                 cfg.data.max_text_len)


def record_run_labels(cfg: Config, info: DatasetInfo, accelerator=None) -> None:
    """Write RUN/labels.json (the label list and evaluation policy) on a new run; on a resumed run, refuse
    data with other labels. Checks objective.pos_weight against the label count."""
    run = RunDir(cfg.run_dir)
    path = run.labels_file
    if path.is_file():
        run.check_labels(info.labels, info.root)
    elif accelerator is None or accelerator.is_main_process:
        # Renamed into place: another rank may be reading it already.
        atomic_write_text(path, json.dumps({"labels": list(info.labels), "eval_policy": info.eval_policy.to_dict(),
                                            "data": str(info.root)}, indent=2))
    weights = cfg.objective.pos_weight
    if weights is not None and len(weights) != len(info.labels):
        raise ConfigError(f"objective.pos_weight lists {len(weights)} numbers; {info.root} has "
                          f"{len(info.labels)} labels ({', '.join(info.labels)})")


# Keys of the shape sections that may change on resume: none changes a tensor's shape or the optimizer's state.
RESUMABLE_MODEL_KEYS = ("gradient_checkpointing", "attn_implementation", "inference", "num_samples",
                        "image_weights", "init_from", "init_modules")  # read at initialisation: the checkpoint wins


def _model_shape(cfg: Config) -> dict:
    """What fixes the model's tensors (and so what a checkpoint holds): model.*, data.image_size, objective.name."""
    model = {f"model.{k}": v for k, v in to_dict(cfg.model).items() if k not in RESUMABLE_MODEL_KEYS}
    return {**model, "data.image_size": cfg.data.image_size, "objective.name": cfg.objective.name}


def check_resume_config(cfg: Config, ckpt: Optional[Path]) -> None:
    """Resuming from `ckpt`, refuse a config that changes the model's shape against the config.yaml of the run
    being resumed, naming each key with its old and new value. Before anything is loaded or written; labels are
    compared by `record_run_labels` once the data set is read."""
    if ckpt is None:
        return
    if not (ckpt / checkpoint.STATE_FILE).is_file():
        raise ConfigError(f"resume={cfg.resume}: {ckpt}: not a checkpoint (no {checkpoint.STATE_FILE})")
    # RUN/checkpoints/step-N: the run whose weights are loaded (else this run's own config, if it has one)
    run = RunDir.containing(ckpt) or RunDir(cfg.run_dir)
    if not run.is_run():
        return
    old, new = _model_shape(run.config()), _model_shape(cfg)
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k]]
    if changed:
        raise ConfigError(f"resume={cfg.resume}: the config changes the model's shape against {run.config_file}: "
                          f"{', '.join(changed)} (set them back, or start a new run_dir)")


def warn_unscorable(info: DatasetInfo, split: str, log) -> None:
    """Once at start: labels of the validation split that have a single class are left out of its macro AUROC."""
    scorable = info.scorable_labels(split)
    left_out = [n for n in info.labels if n not in scorable]
    if left_out:
        log(f"warning: on split {split!r} these labels have a single class under the evaluation policy and are "
            f"left out of its macro AUROC: {', '.join(left_out)}")
