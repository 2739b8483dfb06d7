"""What a run needs before its first step: the data set (building the synthetic default if asked) and the
tokenizer. Rank 0 does the work; the other ranks wait and then read the result."""

from __future__ import annotations

from pathlib import Path

from vkd_dist.data.schema import DatasetInfo, read_dataset
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


def resolve_tokenizer(cfg, info: DatasetInfo, accelerator=None):
    """model.tokenizer dir > the text encoder's own dir > RUN/tokenizer (built from training reports once)."""
    m = cfg.model
    if cfg.objective.name == "kd":  # the student's batches feed the teacher: use the teacher's vocabulary
        teacher = Path(cfg.objective.kd_teacher)
        teacher = teacher if (teacher / "config.yaml").is_file() else teacher.parent
        if (teacher / "tokenizer" / "tokenizer.json").is_file():
            return load_tokenizer(teacher / "tokenizer")
    if m.tokenizer:
        return load_tokenizer(m.tokenizer)
    if m.text_encoder != "tiny-bert":
        return load_tokenizer(m.text_encoder)
    out = Path(cfg.run_dir) / "tokenizer"
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not (out / "tokenizer.json").is_file():
        train_wordpiece(report_texts(info.shards(cfg.data.train_split)), m.vocab_size, out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_tokenizer(out)
