"""Batches composed by what the objective learns from (vkd_dist/data/compose.py), on a tenth-labelled corpus:
labelled studies only for image_only, data.labelled_share of every batch for a distilling objective, exact
resume of the composed stream, and the ordinary stream wherever every study is labelled."""

import pytest
import torch

from conftest import tiny_overrides
from vkd_dist.config import ConfigError, DataConfig
from vkd_dist.configure import load_config
from vkd_dist.data.compose import LABELLED, MIXED, PAIRED, ComposedStream, keys_by_label, train_stream
from vkd_dist.data.pipeline import TrainStream, train_loader
from vkd_dist.data.schema import read_dataset
from vkd_dist.data.tokens import build_wordpiece_tokenizer, report_texts
from vkd_dist.ledger import ledger_files, read_ledger
from vkd_dist.prepare import prepare_run
from vkd_dist.train import train


@pytest.fixture(scope="module")
def tenth(tmp_path_factory):
    """`vkd-data synthetic --label-fraction 0.1`, small: 120 training studies (12 labelled) in 4 shards."""
    from vkd_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("tenth")
    build_synthetic(out, 120, 16, 16, image_size=64, seed=1, label_fraction=0.1, samples_per_shard=32, workers=1,
                    progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(tenth, tmp_path_factory):
    return build_wordpiece_tokenizer(report_texts(read_dataset(tenth).shards("train")), 300,
                                     tmp_path_factory.mktemp("tok") / "tokenizer")


def _cfg(**kw):
    return DataConfig(**{"image_size": 64, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16,
                         "max_text_len": 64, **kw})


def test_the_subsets_are_read_from_the_shards(tenth):
    keys = keys_by_label(read_dataset(tenth).shards("train"))
    assert len(keys["labelled"]) == 12 and len(keys["unlabelled"]) == 108
    assert not keys["labelled"] & keys["unlabelled"]


def _ledger_steps(run):
    steps: dict = {}
    for path in ledger_files(run):
        for _, step, key in read_ledger(path):
            steps.setdefault(step, []).append(key)
    return steps


def test_image_only_reads_labelled_studies_only_and_vkd_the_set_share(tenth, tmp_path, capsys):
    keys = keys_by_label(read_dataset(tenth).shards("train"))
    for objective, share, labelled_per_step in (("image_only", 0.5, 8), ("vkd", 0.25, 2)):
        run = tmp_path / objective
        train(load_config(overrides=tiny_overrides(tenth, run, objective=objective, **{
            "train.max_steps": 4, "train.test_at_end": "false", "logging.sample_ledger": "true",
            "data.labelled_share": share, "data.num_workers": 0})))
        steps = _ledger_steps(run)
        assert sorted(steps) == [1, 2, 3, 4]
        for rows in steps.values():
            assert len(rows) == 8 and sum(k in keys["labelled"] for k in rows) == labelled_per_step
        said = {"image_only": "batches: labelled studies only (8 a batch)",
                "vkd": "batches: 2 labelled + 6 unlabelled studies each"}[objective]
        assert said in capsys.readouterr().out


def test_a_composed_stream_resumes_exactly_across_the_unlabelled_streams_epochs(tenth, tokenizer):
    info = read_dataset(tenth)
    cfg = _cfg(labelled_share=0.25)  # 2 labelled + 6 unlabelled: an epoch is 12 / 2 = 6 batches (3 per worker)

    def stream():
        s = train_stream(info, "train", cfg, tokenizer, 0, 1, 7, None, MIXED)
        assert isinstance(s, ComposedStream)
        return s

    def take(s, epoch, skip, n):
        it = s.epoch(epoch, skip)
        return [next(it) for _ in range(n)]

    whole = stream()
    full = [b for e in range(4) for b in whole.epoch(e, 0)]  # 24 steps: 144 unlabelled, more than its 108
    assert all(b.labelled.tolist() == [True] * 2 + [False] * 6 for b in full)
    assert whole.unlabelled_at[0] >= 1  # the unlabelled stream went into its second epoch
    first = stream()
    got = [b for e in range(2) for b in first.epoch(e, 0)] + take(first, 2, 0, 3)  # 15 steps: stop mid-epoch 2
    saved = ([first.offsets], [first.reads], first.layout(2).to_dict())
    second = stream()
    assert second.resume(2, 3, *saved) == (2, 3, None)
    got += [b for b in second.epoch(2, 3)] + list(second.epoch(3, 0))
    assert [b.keys for b in got] == [b.keys for b in full]
    for a, b in zip(got, full):  # pixels and token ids too
        assert torch.equal(a.image, b.image) and torch.equal(a.input_ids, b.input_ids)
    # On another layout the rest-of-epoch replay would read every study, not the subset: refused in one line.
    other = train_stream(info, "train", _cfg(labelled_share=0.25, num_workers=1), tokenizer, 0, 1, 7, None, MIXED)
    with pytest.raises(ConfigError, match=r"resumes on the layout it was saved with \(1 process\(es\) x 2 worker"):
        other.resume(2, 3, *saved)
    plain = train_loader(info, "train", cfg, tokenizer, 0, 1, 7)
    with pytest.raises(ConfigError, match="not that of a stream composed of labelled and unlabelled"):
        second.resume(0, 1, [plain.offsets], [plain.reads], plain.layout(0).to_dict())


def test_every_study_labelled_or_a_null_share_reads_the_ordinary_stream(tiny_data, tenth, tokenizer, tmp_path):
    fully = read_dataset(tiny_data)
    for learns in (LABELLED, MIXED, PAIRED):
        s = train_stream(fully, "train", _cfg(num_workers=0), tokenizer, 0, 1, 3, None, learns)
        plain = train_loader(fully, "train", _cfg(num_workers=0), tokenizer, 0, 1, 3)
        assert isinstance(s, TrainStream) and [b.keys for b in s.epoch(0)] == [b.keys for b in plain.epoch(0)]
    partial = read_dataset(tenth)
    assert isinstance(train_stream(partial, "train", _cfg(labelled_share=None), tokenizer, 0, 1, 3, None, LABELLED),
                      TrainStream)
    assert isinstance(train_stream(partial, "train", _cfg(), tokenizer, 0, 1, 3, None, PAIRED), TrainStream)
    with pytest.raises(ConfigError, match="data.labelled_share=0.05 of data.batch_size=8 rounds to no labelled"):
        train_stream(partial, "train", _cfg(labelled_share=0.05), tokenizer, 0, 1, 3, None, MIXED)
    share = {"data.labelled_share": 0.05}
    with pytest.raises(ConfigError, match="data.labelled_share=0.05 of data.batch_size=8 rounds to no labelled"):
        prepare_run(load_config(overrides=tiny_overrides(tenth, tenth / "run", **share)), None)  # before any work
    assert not (tenth / "run" / "config.yaml").exists()
    fully_run = tmp_path / "fully-run"  # every study labelled: the share never applies, so no refusal
    prepare_run(load_config(overrides=tiny_overrides(tiny_data, fully_run, **share)), None)
    assert (fully_run / "config.yaml").is_file()
    with pytest.raises(ConfigError, match=r"data.labelled_share=0.0 must be in \(0, 1\] or null"):
        load_config(overrides=tiny_overrides(tenth, tenth / "run", **{"data.labelled_share": 0}))


def test_a_composed_run_resumed_from_its_checkpoint_consumes_what_an_uninterrupted_one_does(tenth, tmp_path):
    def run(name, steps, resume=None):
        overrides = tiny_overrides(tenth, tmp_path / name, **{
            "train.max_steps": steps, "train.test_at_end": "false", "logging.sample_ledger": "true",
            "data.labelled_share": 0.25, "data.num_workers": 0, "train.ckpt_every": 100})
        train(load_config(overrides=[*overrides, *([f"resume={resume}"] if resume else [])]))
        return _ledger_steps(tmp_path / name)

    whole = run("whole", 4)  # the round trip through train_state.json; the streams' epochs: the test above
    run("parts", 2)
    assert run("parts", 4, resume="latest") == whole


def test_every_rank_of_a_composed_stream_takes_the_same_steps_with_the_share(tenth, tokenizer):
    info = read_dataset(tenth)
    ranks = [train_stream(info, "train", _cfg(labelled_share=0.25), tokenizer, rank, 2, 5, None, MIXED)
             for rank in range(2)]
    epochs = [list(s.epoch(0, 0)) for s in ranks]
    assert len(epochs[0]) == len(epochs[1]) == ranks[0].batches_per_epoch > 0
    assert all(b.labelled.sum() == 2 and len(b) == 8 for epoch in epochs for b in epoch)
