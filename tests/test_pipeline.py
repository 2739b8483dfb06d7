import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vkd_dist.config import DataConfig
from vkd_dist.data import pipeline
from vkd_dist.data.pipeline import eval_loader, train_loader
from vkd_dist.data.schema import read_dataset
from vkd_dist.data.tokens import build_wordpiece_tokenizer, report_texts
from vkd_dist.labels import LabelPolicy


@pytest.fixture(scope="module")
def tokenizer(tiny_data, tmp_path_factory):
    info = read_dataset(tiny_data)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return build_wordpiece_tokenizer(report_texts(info.shards("train")), 300, out)


def _cfg(**kw):
    base = dict(image_size=48, batch_size=8, eval_batch_size=7, num_workers=2, shuffle_buffer=16, max_text_len=64)
    base.update(kw)
    return DataConfig(**base)


def test_batch_shapes_and_dtypes(tiny_data, tokenizer):
    stream = train_loader(read_dataset(tiny_data), "train", _cfg(num_workers=0), tokenizer)
    batch = next(iter(stream.epoch(0)))
    assert batch.image.dtype == torch.uint8 and tuple(batch.image.shape) == (8, 1, 48, 48)
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == batch.attention_mask.shape
    assert batch.input_ids.shape[1] <= 64 and (batch.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert batch.targets.shape == (8, 14) and batch.targets.dtype == torch.float32
    assert batch.target_mask.dtype == torch.bool
    assert (batch.targets[~batch.target_mask] == 0).all()
    assert len(batch.keys) == 8


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 1), (1, 3)])
def test_eval_stream_sees_every_sample_exactly_once(tiny_data, tokenizer, world, workers):
    info = read_dataset(tiny_data)
    seen = Counter()
    for split in ("train", "val"):  # train: 4 shards (enough for 2x2); val: 1 shard (sample-level split)
        seen.clear()
        for rank in range(world):
            for batch in eval_loader(info, split, _cfg(num_workers=workers), tokenizer, rank, world):
                seen.update(batch.keys)
        assert len(seen) == info.num_samples(split)
        assert set(seen.values()) == {1}


def test_every_rank_gets_the_same_number_of_steps_with_uneven_shards(tiny_data, tokenizer):
    info = read_dataset(tiny_data)  # train shards hold 32, 32, 32 and 4 samples
    counts, keys = [], []
    for rank in range(2):
        stream = train_loader(info, "train", _cfg(), tokenizer, rank=rank, world=2, seed=5)
        for epoch in range(2):
            batches = list(stream.epoch(epoch))
            counts.append(len(batches))
            keys.append([k for b in batches for k in b.keys])
    assert len(set(counts)) == 1 and counts[0] == stream.batches_per_epoch
    assert counts[0] * 8 * 2 >= 100  # a virtual epoch covers the split
    assert keys[0] != keys[1]  # epochs are reshuffled
    assert set(keys[0]).isdisjoint(keys[2]) or len(set(keys[0]) & set(keys[2])) < len(keys[0]) // 2


def test_train_stream_is_deterministic_and_resumes_exactly(tiny_data, tokenizer):
    info = read_dataset(tiny_data)
    cfg = _cfg()

    def run(skip):
        stream = train_loader(info, "train", cfg, tokenizer, rank=0, world=1, seed=9)
        return list(stream.epoch(1, skip))

    full, again, tail = run(0), run(0), run(3)
    assert [b.keys for b in full] == [b.keys for b in again]
    assert [b.keys for b in tail] == [b.keys for b in full[3:]]
    for a, b in zip(tail, full[3:]):  # decoded pixels too, not just keys
        assert torch.equal(a.image, b.image)


def _write_bad_shard(path: Path, good_from: Path):
    """A tar with good samples, an undecodable image, bad json, a sample without an image, then a cut-off end."""
    with tarfile.open(good_from) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()[:9]]  # 3 good samples
    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, data in members:
            add(tf, m.name, data)
        good_json = members[2][1] if members[2][0].name.endswith("json") else members[1][1]
        add(tf, "bad-img.jpg", b"\xff\xd8 not a jpeg")
        add(tf, "bad-img.txt", b"report")
        add(tf, "bad-img.json", good_json)
        add(tf, "bad-json.jpg", members[0][1])
        add(tf, "bad-json.txt", b"report")
        add(tf, "bad-json.json", b"{not json")
        add(tf, "no-img.txt", b"report")
        add(tf, "no-img.json", good_json)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) - 700])  # truncated: the tar ends mid-member


def test_corrupt_samples_and_shards_are_skipped_and_counted(tiny_data, tokenizer, tmp_path):
    info = read_dataset(tiny_data)
    bad = tmp_path / "val" / "shard-000000.tar"
    bad.parent.mkdir()
    _write_bad_shard(bad, Path(info.shards("val")[0]))
    meta = json.loads((tiny_data / "dataset.json").read_text())
    meta["splits"]["val"] = {"num_samples": 6, "shards": [{"name": bad.name, "num_samples": 6}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    batches = list(eval_loader(read_dataset(tmp_path), "val", _cfg(num_workers=0), tokenizer))
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == 3 and not any(k.startswith(("bad", "no-img")) for k in keys)
    assert batches[-1].skipped >= 3  # bad image, bad json, no image (and the cut-off tar)


def test_training_policy_reaches_train_batches_and_eval_uses_the_datasets(tiny_data, tokenizer):
    info = read_dataset(tiny_data)
    first = lambda cfg: next(iter(train_loader(info, "train", cfg, tokenizer).epoch(0)))  # noqa: E731
    ignore = first(_cfg(num_workers=0, uncertain="ignore", missing="mask"))
    neg = first(_cfg(num_workers=0, uncertain="ones", missing="negative"))
    assert ignore.keys == neg.keys
    assert neg.target_mask.sum() > ignore.target_mask.sum()
    assert neg.target_mask.all()  # missing -> negative, uncertain -> one: every entry counts
    assert neg.targets.sum() >= ignore.targets.sum()
    # Evaluation ignores the training policy: blank is negative and uncertain left out, as dataset.json says.
    assert info.eval_policy.to_dict() == {"uncertain": "ignore", "missing": "negative"}
    a = next(iter(eval_loader(info, "val", _cfg(num_workers=0, uncertain="ignore", missing="mask"), tokenizer)))
    b = next(iter(eval_loader(info, "val", _cfg(num_workers=0, uncertain="ones", missing="negative"), tokenizer)))
    assert a.keys == b.keys and torch.equal(a.targets, b.targets) and torch.equal(a.target_mask, b.target_mask)
    assert len(a.patient_ids) == len(a.keys) and all(a.patient_ids)
    from vkd_dist.labels import encode_labels

    samples = {s["key"]: s for s in pipeline.decoded(iter(_raw_samples(info, "val")), 48)}
    for i, key in enumerate(a.keys):
        t, m = encode_labels(samples[key]["labels"], "ignore", "negative")
        assert a.targets[i].tolist() == t.tolist() and a.target_mask[i].tolist() == m.tolist()


def _raw_samples(info, split):
    import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList(info.shards(split)), wds.tarfile_to_samples())


@pytest.mark.parametrize("max_len", [128, 24])
def test_token_table_and_cached_tokenisation_equal_the_tokenizer_call(tokenizer, tiny_data, tmp_path, max_len):
    from vkd_dist.data.pipeline import Collate
    from vkd_dist.data.schema import shard_reports
    from vkd_dist.data.tokens import build_token_table

    shards = read_dataset(tiny_data).shards("val")
    reports = list(shard_reports(shards))[:12]
    keys, texts = [k for k, _ in reports], [t for _, t in reports]
    keys += [keys[0], "not-in-table-1", "not-in-table-2"]  # a repeat, and two reports the table lacks
    texts += [texts[0], "", "word " * 300]  # ... an empty and an over-long one
    ref = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, pad_to_multiple_of=8,
                    return_tensors="pt")
    table = build_token_table(tmp_path / "tokens", "val", shards, tokenizer, max_len)
    assert len(table) == read_dataset(tiny_data).num_samples("val")
    for tokens in (None, table):
        collate = Collate(tokenizer, max_len, LabelPolicy("ignore", "mask"), tokens=tokens)
        for _ in range(2):  # second pass: reports come from the table or the per-worker cache
            ours = collate._tokenize(texts, keys)
            assert torch.equal(ours["input_ids"], ref["input_ids"])
            assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert set(collate._ids) == {"", "word " * 300}  # only what the table lacked was tokenised here


def test_token_table_is_reused_until_its_inputs_change(tokenizer, tiny_data, tmp_path):
    import pickle

    from vkd_dist.data.tokens import build_token_table

    shards = read_dataset(tiny_data).shards("val")
    first = build_token_table(tmp_path, "val", shards, tokenizer, 64)
    ids = first.get(first._path("keys.json").read_text().split('"')[1]).copy()
    stamp = first._path("json").stat().st_mtime_ns
    assert build_token_table(tmp_path, "val", shards, tokenizer, 64)._path("json").stat().st_mtime_ns == stamp
    shorter = build_token_table(tmp_path, "val", shards, tokenizer, 8)  # another max_text_len: rebuilt
    assert shorter._path("json").stat().st_mtime_ns != stamp
    key = shorter._path("keys.json").read_text().split('"')[1]
    assert len(shorter.get(key)) == 8 and len(ids) > 8
    clone = pickle.loads(pickle.dumps(shorter))  # what a spawned worker gets: paths only, opened lazily
    assert clone._rows is None and np.array_equal(clone.get(key), shorter.get(key))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.ids.npy", "val.json", "val.keys.json",
                                                          "val.offsets.npy"]  # no temporary files left


def test_loader_workers_survive_a_parallel_token_table_build(tokenizer, tiny_data, tmp_path):
    """The token table runs the tokenizer's thread pool in the parent; forked workers that then tokenise (the eval
    stream has no table) deadlock in that pool unless they turn parallelism off, even if the user turned it on."""
    import os
    import subprocess
    import sys

    script = f"""
import sys
from vkd_dist.config import DataConfig
from vkd_dist.data.pipeline import eval_loader
from vkd_dist.data.schema import read_dataset
from vkd_dist.data.tokens import build_token_table, load_tokenizer
tok, info = load_tokenizer({str(tokenizer.name_or_path)!r}), read_dataset({str(tiny_data)!r})
build_token_table({str(tmp_path / 'tokens')!r}, "train", info.shards("train"), tok, 64)
cfg = DataConfig(image_size=48, eval_batch_size=7, num_workers=2, max_text_len=64)
print(sum(len(b) for b in eval_loader(info, "val", cfg, tok)))
"""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == read_dataset(tiny_data).num_samples("val")


def corrupt_copy(src: Path, dst: Path, bad_image) -> Path:
    """A copy of the data set at `src` whose train samples with `bad_image(key)` true have an undecodable image
    (dataset.json unchanged: the counts include them, as a converter's would)."""
    import shutil

    shutil.copytree(src, dst)
    for tar_path in sorted((dst / "train").glob("shard-*.tar")):
        with tarfile.open(tar_path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        with tarfile.open(tar_path, "w") as tf:
            for m, data in members:
                key, ext = m.name.split(".", 1)
                if ext == "jpg" and bad_image(key):
                    data = b"not an image"
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
    return dst


@pytest.fixture(scope="module")
def corrupt_data(tiny_data, tmp_path_factory):
    """The tiny corpus with every 13th training image undecodable (8 of 100)."""
    every_13th = lambda key: int(key.split("-")[1]) % 13 == 0  # noqa: E731
    return corrupt_copy(tiny_data, tmp_path_factory.mktemp("corrupt") / "data", every_13th)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_skipped_samples_gives_exactly_the_same_batches(corrupt_data, tokenizer, workers):
    """A worker that skipped c corrupt samples had read b x batch_size + c raw ones; the resumed stream starts
    each worker where it was (TrainStream.offsets), in whole rounds and mid-round."""
    info, cfg = read_dataset(corrupt_data), _cfg(num_workers=workers)
    stream = lambda: train_loader(info, "train", cfg, tokenizer, seed=3)  # noqa: E731
    uninterrupted = stream()
    full = list(uninterrupted.epoch(1))
    keys = [b.keys for b in full]
    assert sum({b.worker: b.skipped for b in full}.values()) > 0 and len(keys) == uninterrupted.batches_per_epoch
    for stop in (3, 6):
        first = stream()
        batches = first.epoch(1)
        assert [next(batches).keys for _ in range(stop)] == keys[:stop]
        resumed = stream()
        resumed.resume(1, stop, [first.offsets], [first.reads], first.layout(1).to_dict())  # what a checkpoint saves
        assert [b.keys for b in resumed.epoch(1, stop)] == keys[stop:], stop
    # Without offsets (a checkpoint from before they were saved) workers skip whole batches of raw samples, which
    # misses the corrupt ones they had read: the stream is shifted.
    old = stream()
    old.resume(1, 6)
    assert [b.keys for b in old.epoch(1, 6)] != keys[6:]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_checkpoint_without_a_layout_at_an_epochs_end_starts_the_next_epoch_from_its_start(tiny_data, tokenizer,
                                                                                            workers):
    """A checkpoint written before layouts were saved, at the end of an epoch: its offsets are that epoch's ends.
    The next epoch is read as an uninterrupted run reads it, not from those offsets (a whole quota skipped, the
    unshuffled tail read)."""
    info, cfg = read_dataset(tiny_data), _cfg(num_workers=workers)
    stream = lambda: train_loader(info, "train", cfg, tokenizer, seed=3)  # noqa: E731
    uninterrupted = stream()
    list(uninterrupted.epoch(1))
    expected = [b.keys for b in uninterrupted.epoch(2)]
    first = stream()
    list(first.epoch(1))
    resumed = stream()
    assert resumed.resume(1, first.batches_per_epoch, [first.offsets]) == (2, 0, None)
    assert [b.keys for b in resumed.epoch(2)] == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_a_systematic_decode_error_stops_the_stream_with_what_and_where(tiny_data, tokenizer, tmp_path, workers):
    """Every image undecodable (a wrong setting, a broken converter): the stream stops within max_skip_frac x 200
    reads instead of cycling for ever, and the error reaches the main process from the loader's workers."""
    from vkd_dist.data.faults import SkipRateError

    info = read_dataset(corrupt_copy(tiny_data, tmp_path / "data", lambda k: True))
    stream = train_loader(info, "train", _cfg(num_workers=workers), tokenizer)
    with pytest.raises(SkipRateError) as caught:
        next(iter(stream.epoch(0)))
    assert re.search(r"11 of the last 11 samples \(and shards\) read failed, more than data.max_skip_frac=0.05 "
                     r"allows; most frequent error \(11 of 11\): UnidentifiedImageError: cannot identify image file "
                     r"<_io.BytesIO object>; first at sample train-\d+ in \S+/train/shard-\d+\.tar", str(caught.value))


def test_unreadable_shards_stop_the_stream_naming_the_shard(tiny_data, tokenizer, tmp_path):
    import shutil

    from vkd_dist.data.faults import SkipRateError

    shutil.copytree(tiny_data, tmp_path / "data")
    for tar_path in (tmp_path / "data" / "train").glob("shard-*.tar"):
        tar_path.unlink()
    stream = train_loader(read_dataset(tmp_path / "data"), "train", _cfg(num_workers=0), tokenizer)
    with pytest.raises(SkipRateError, match=r"most frequent error \(11 of 11\): FileNotFoundError: No such file or "
                                            r"directory; first at shard \S+/train/shard-\d+\.tar"):
        next(iter(stream.epoch(0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bug_in_decoding_is_raised_not_skipped(tiny_data, tokenizer, monkeypatch, workers):
    def buggy(data):
        raise TypeError("a bug, not a corrupt sample")

    monkeypatch.setattr(pipeline, "decode_image", buggy)  # forked workers inherit the patch
    stream = train_loader(read_dataset(tiny_data), "train", _cfg(num_workers=workers), tokenizer)
    with pytest.raises(TypeError, match="a bug, not a corrupt sample"):
        next(iter(stream.epoch(0)))


def test_training_follows_the_datasets_policy_unless_overridden_and_unlabelled_studies_are_masked(tmp_path, tokenizer):
    from vkd_dist.data.pipeline import training_policy
    from vkd_dist.data.synthetic import build_synthetic

    build_synthetic(tmp_path, 40, 8, 8, image_size=48, seed=1, label_fraction=0.25, samples_per_shard=40,
                    workers=1, progress=False)
    info = read_dataset(tmp_path)
    assert info.train_policy == info.eval_policy == LabelPolicy("ignore", "negative")
    assert training_policy(info, _cfg()) == LabelPolicy("ignore", "negative")  # null keys: the data set's
    assert training_policy(info, _cfg(missing="mask")) == LabelPolicy("ignore", "mask")
    unlabelled = {s["key"] for s in pipeline.decoded(iter(_raw_samples(info, "train")), 48) if not s["labelled"]}
    assert len(unlabelled) == 30
    batches = list(train_loader(info, "train", _cfg(num_workers=0, batch_size=40, shuffle_buffer=1),
                                tokenizer).epoch(0))
    rows = {k: (t, m) for b in batches for k, t, m in zip(b.keys, b.targets, b.target_mask)}
    assert len(rows) == 40
    for key, (targets, mask) in rows.items():
        if key in unlabelled:  # masked whole, although blank reads as negative
            assert not mask.any() and not targets.any()
        else:  # a labelled study under blank = negative: only its uncertain entries are left out
            assert mask.sum() >= 10
    # A data set that declares another training policy is trained with it.
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["train_policy"] = {"uncertain": "zeros", "missing": "mask"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert training_policy(read_dataset(tmp_path), _cfg()) == LabelPolicy("zeros", "mask")
    meta["train_policy"] = {"uncertain": "maybe", "missing": "mask"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json: 'train_policy' .*uncertain='maybe'"):
        read_dataset(tmp_path)


def _consume(streams, epoch, skip, count=None):
    """Each rank's stream takes `count` batches of `epoch` (all of them by default); returns the keys per rank, the
    batches per rank and what a checkpoint would save then."""
    taken, batches = [], []
    for s in streams:
        it = s.epoch(epoch, skip)
        got = list(it) if count is None else [next(it) for _ in range(count)]
        taken.append([k for b in got for k in b.keys])
        batches.append(len(got))
    saved = ([s.offsets for s in streams], [s.reads for s in streams], streams[0].layout(epoch).to_dict())
    return taken, batches, saved


@pytest.mark.parametrize("hops", [[(2, 2), (1, 2)], [(1, 0), (2, 2)], [(2, 0), (1, 2), (3, 0)], [(2, 2), (2, 0)]],
                         ids=["2x2->1x2", "1x1->2x2", "2->1->3", "workers2->1"])
def test_the_rest_of_an_epoch_is_read_exactly_once_on_another_layout(tiny_data, tokenizer, hops):
    """Interrupted mid-epoch on N processes x W workers and resumed on M x W' (again mid-way, on a third): every
    sample the uninterrupted epoch reads is read once in all, none twice, none left out; every rank of a layout
    takes the same number of batches; the next epoch is the new layout's own."""
    info = read_dataset(tiny_data)

    def streams(world, workers):
        cfg = _cfg(num_workers=workers)
        return [train_loader(info, "train", cfg, tokenizer, rank=r, world=world, seed=5) for r in range(world)]

    reference, _, _ = _consume(streams(*hops[0]), 1, 0)
    expected = Counter(k for rank in reference for k in rank)
    taken, _, saved = _consume(streams(*hops[0]), 1, 0, count=3)
    seen = Counter(k for rank in taken for k in rank)
    for i, (world, workers) in enumerate(hops[1:], 1):
        resumed = streams(world, workers)
        starts = {r.resume(1, 3 if i == 1 else 2, *saved)[:2] for r in resumed}
        assert starts == {(1, 0)}  # every rank: the rest of epoch 1, from its start
        last = i == len(hops) - 1
        taken, batches, saved = _consume(resumed, 1, 0, None if last else 2)
        assert len(set(batches)) == 1, batches  # every rank takes the same number of steps
        assert saved[2]["rest_of"] is not None and saved[2]["world"] == world
        seen.update(k for rank in taken for k in rank)
    assert seen == expected, (sum(seen.values()), sum(expected.values()))
    nxt = resumed[0].layout(2)
    assert nxt.rest_of is None and nxt.world == hops[-1][0]


@pytest.mark.parametrize("before, after, left", [
    ((2, 0, 8), (1, 0, 8), 0),  # a checkpoint at the epoch's end: nothing unread
    ((1, 0, 1), (2, 2, 1), 1),  # one sample left for two processes: read with the next epoch
    ((1, 0, 1), (2, 0, 1), 57),  # batch size 1, a rest that does not divide over the processes
    ((1, 0, 2), (4, 0, 2), 2),  # fewer samples than processes
], ids=["at-the-end", "one-left", "odd-at-batch-1", "fewer-than-processes"])
def test_small_and_uneven_rests_are_read_exactly_once_on_another_layout(tiny_data, tokenizer, before, after, left):
    """The rests that cannot be dealt as whole batches of batch_size on every rank: read once in all, in equal
    steps on every rank; a rest smaller than the processes is read with the next epoch, and that epoch once too."""
    info = read_dataset(tiny_data)

    def streams(world, workers, batch):
        cfg = _cfg(num_workers=workers, batch_size=batch)
        return [train_loader(info, "train", cfg, tokenizer, rank=r, world=world, seed=5) for r in range(world)]

    first = streams(*before)
    reference, _, _ = _consume(first, 1, 0)
    expected = Counter(k for rank in reference for k in rank)
    steps = (sum(map(len, reference)) - left) // (before[0] * before[2])
    taken, _, saved = _consume(streams(*before), 1, 0, count=steps)
    seen = Counter(k for rank in taken for k in rank)
    resumed = streams(*after)
    starts = {r.resume(1, steps, *saved) for r in resumed}
    (epoch, skip, line), = starts
    assert skip == 0 and (epoch == 1) == (left >= after[0]) and line
    if epoch == 2:  # nothing left, or read with epoch 2: that epoch, as the new layout deals it, is owed too
        nxt, _, _ = _consume(streams(*after), 2, 0)
        expected.update(k for rank in nxt for k in rank)
    rest, batches, _ = _consume(resumed, epoch, 0)
    assert len(set(batches)) == 1, batches
    seen.update(k for rank in rest for k in rank)
    assert seen == expected, (sum(seen.values()), sum(expected.values()))
