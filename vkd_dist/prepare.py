"""What a run needs before its first step: the data set (building the synthetic default if asked), the
tokenizer and the training reports' token ids. Rank 0 does the work; the other ranks wait and then read the
result."""

from __future__ import annotations

from pathlib import Path

from vkd_dist.data.schema import DatasetInfo, read_dataset
from vkd_dist.data.tokens import build_token_table
from vkd_dist.models.encoders import load_tokenizer, report_texts, train_wordpiece


def ensure_dataset(cfg, accelerator=None) -> DatasetInfo:
    path = Path(cfg.data.path)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not (path / "dataset.json").is_file():
        if not cfg.data.build_synthetic:
            raise FileNotFoundError(f"data.path={path}: no dataset.json (convert data with vkd-data first)")
        from vkd_dist.data.synthetic import build_synthetic

        s = cfg.data.synthetic
        print(f"building the synthetic corpus at {path} ({s.num_train}/{s.num_val}/{s.num_test} samples)", flush=True)
        build_synthetic(path, s.num_train, s.num_val, s.num_test, image_size=s.image_size, seed=s.seed,
                        lesion_contrast=s.lesion_contrast, noise=s.noise, label_noise=s.label_noise,
                        prevalence_scale=s.prevalence_scale, progress=False)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return read_dataset(path)


def teacher_run_dir(cfg) -> Path:
    """objective.kd_teacher names a text_only run directory or a checkpoint inside one."""
    path = Path(cfg.objective.kd_teacher)
    return path if (path / "config.yaml").is_file() else path.parent


def tokenizer_dir(cfg, run_dir: str | Path) -> Path:
    """Where a run's tokenizer lives: the kd teacher's (its batches feed the teacher) > model.tokenizer > the
    text encoder's own directory > RUN/tokenizer (built from the training reports by `resolve_tokenizer`)."""
    if cfg.objective.name == "kd":
        teacher = teacher_run_dir(cfg) / "tokenizer"
        if (teacher / "tokenizer.json").is_file():
            return teacher
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    if cfg.model.text_encoder != "tiny-bert":
        return Path(cfg.model.text_encoder)
    return Path(run_dir) / "tokenizer"


def resolve_tokenizer(cfg, info: DatasetInfo, accelerator=None):
    """The run's tokenizer (see `tokenizer_dir`), building RUN/tokenizer on rank 0 the first time."""
    path = tokenizer_dir(cfg, cfg.run_dir)
    if path == Path(cfg.run_dir) / "tokenizer":
        is_main = accelerator is None or accelerator.is_main_process
        if is_main and not (path / "tokenizer.json").is_file():
            train_wordpiece(report_texts(info.shards(cfg.data.train_split)), cfg.model.vocab_size, path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return load_tokenizer(path)


def token_table(cfg, info: DatasetInfo, tokenizer, accelerator=None):
    """The training split's TokenTable in RUN/tokens (built on rank 0 the first time), or None when
    data.pretokenize is off or the tokenizer has no fast backend."""
    if not cfg.data.pretokenize:
        return None
    root, split = Path(cfg.run_dir) / "tokens", cfg.data.train_split
    build = lambda: build_token_table(root, split, info.shards(split), tokenizer, cfg.data.max_text_len)  # noqa: E731
    is_main = accelerator is None or accelerator.is_main_process
    table = build() if is_main else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return table if is_main else build()  # the others find rank 0's table
