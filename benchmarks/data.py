"""The data parts: `decode` (the raw ceiling), `pipeline` (our training stream, with a per-sample cost breakdown)
and `open_clip` (the peer's WebDataset pipeline on the same shards)."""

from __future__ import annotations

import itertools
import json
import tarfile
import time
from collections.abc import Iterator

from benchmarks.bench import Bench, best, epoch_rates, one_thread


def measure_decode(b: Bench) -> dict:
    """Read the tar members and decode each image to uint8 grayscale: nothing else. One core."""
    from vkd_dist.data.schema import decode_image

    limit = 200 if b.quick else 2000

    def once() -> float:
        n, start = 0, time.perf_counter()
        for data in itertools.islice(_image_members(b.urls), limit):
            decode_image(data)
            n += 1
        return n / (time.perf_counter() - start)

    with one_thread():
        rate = best(once, b.repeat)
    return {"decode_img_s_per_core": rate}


def _image_members(urls) -> Iterator[bytes]:
    """The ceiling's read: each tar opened for random access, only the image members' bytes extracted."""
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")):
                    yield tar.extractfile(member).read()


def _bench_epoch_samples(b: Bench) -> int:
    return min(b.info.num_samples(b.cfg.data.train_split), 20_000)  # a virtual epoch on a large corpus


def measure_pipeline(b: Bench) -> dict:
    """Our train_loader as the trainer runs it (with the run's token table, built here and timed), whole
    epochs: in-process (= one worker, one thread), first epoch and second; with data.num_workers worker
    processes (second epoch: workers already started); and in-process without the token table (reports
    tokenised in the loader, cached per worker from the second epoch)."""
    from dataclasses import replace

    from vkd_dist.data.pipeline import train_loader
    from vkd_dist.data.tokens import build_token_table

    split, workers = b.cfg.data.train_split, max(1, b.cfg.data.num_workers)
    start = time.perf_counter()
    tokens = build_token_table(b.workdir / "tokens", split, b.info.shards(split), b.tokenizer, b.cfg.data.max_text_len)
    build_s = time.perf_counter() - start

    def rates(num_workers: int, table=tokens) -> list[float]:
        cfg = replace(b.cfg.data, num_workers=num_workers, samples_per_epoch=_bench_epoch_samples(b))
        stream = train_loader(b.info, split, cfg, b.tokenizer, seed=b.cfg.train.seed, tokens=table)
        return epoch_rates(stream.epoch(e) for e in range(2))

    with one_thread():
        in_process = [rates(0) for _ in range(b.repeat)]
        untabled = [rates(0, None) for _ in range(b.repeat)]
    n_workers = max(rates(workers)[1] for _ in range(b.repeat))
    return {"pipeline_samples_s_per_worker": max(r[0] for r in in_process),
            "pipeline_samples_s_per_worker_epoch2": max(r[1] for r in in_process),
            "pipeline_no_token_table_samples_s_per_worker": max(r[0] for r in untabled),
            "pipeline_no_token_table_samples_s_per_worker_epoch2": max(r[1] for r in untabled),
            "token_table_build_s": build_s, "token_table_reports_s": len(tokens) / build_s if tokens else None,
            "pipeline_workers": workers, "pipeline_samples_s_n_workers": n_workers, **_pipeline_breakdown(b, tokens)}


def _pipeline_breakdown(b: Bench, tokens) -> dict:
    """Per-sample cost of each stage of our pipeline, in-process: where the time of a sample goes; and the
    device-side batch augmentation that the training step adds."""
    import torch
    import webdataset as wds

    from vkd_dist.data.augment import BatchAugment
    from vkd_dist.data.pipeline import Collate, training_policy
    from vkd_dist.data.schema import decode_image

    def first_shard():
        return wds.DataPipeline(wds.SimpleShardList(b.urls[:1]), wds.tarfile_to_samples())

    raws = list(itertools.islice(first_shard(), 4 * b.batch))
    d = b.cfg.data
    ms: dict = {}

    def timed(name: str, fn, repeat: int = 3):
        """Runs fn `repeat` times, records its best ms per sample under `name`, returns its result."""
        fastest = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            out = fn()
            fastest = min(fastest, time.perf_counter() - start)
        ms[name] = 1e3 * fastest / len(raws)
        return out

    def collate_all(collate):
        return [collate(samples[i:i + b.batch]) for i in range(0, len(samples), b.batch)]

    def read_ms(members) -> float:
        start, n = time.perf_counter(), sum(1 for _ in members)
        return 1e3 * (time.perf_counter() - start) / max(1, n)

    policy = training_policy(b.info, d)
    live = Collate(b.tokenizer, d.max_text_len, policy)
    tabled = Collate(b.tokenizer, d.max_text_len, policy, tokens=tokens)
    for collate in (live, tabled):  # once per worker, not per sample: the tokenizer backend
        collate._token_ids([], [])
    with one_thread():
        ms["tar read, image members only (the ceiling's)"] = min(read_ms(_image_members(b.urls[:1])) for _ in range(3))
        ms["tar read, webdataset, every member"] = min(read_ms(first_shard()) for _ in range(3))
        images = timed("decode", lambda: [decode_image(r["jpg"]) for r in raws])
        samples = timed("json_text", lambda: [
            {"key": r["__key__"], "image": o, "text": r["txt"].decode(), **_labels_and_patient(r["json"])}
            for r, o in zip(raws, images)])
        batches = timed("collate, token table", lambda: collate_all(tabled))
        timed("collate, no table, tokenising", lambda: collate_all(live), repeat=1)
        timed("collate, no table, per-worker cache", lambda: collate_all(live))  # the same reports again
        timed("tokenizer __call__ alone", lambda: [
            b.tokenizer([s["text"] for s in samples[i:i + b.batch]], padding="longest", truncation=True,
                        max_length=d.max_text_len, pad_to_multiple_of=8, return_tensors="pt")
            for i in range(0, len(samples), b.batch)])
    augment = BatchAugment(d, b.cfg.train.seed)
    on_device = [batch.to(b.device) for batch in batches]
    augment(on_device[0], 0)

    def augment_all():
        for i, batch in enumerate(on_device):
            augment(batch, i)
        b.sync()

    timed(f"batch augment on {b.device.type} ({torch.get_num_threads()} threads)", augment_all, repeat=1)
    return {"breakdown_ms_per_sample": ms}


def _labels_and_patient(raw_json: bytes) -> dict:
    meta = json.loads(raw_json)
    return {"labels": meta["labels"], "patient_id": meta["patient_id"]}


def measure_open_clip(b: Bench) -> dict:
    """open_clip's WebDataset training pipeline (open-clip-torch 3.3.0) on the same shards, in-process."""
    from types import SimpleNamespace

    from torchvision import transforms as T

    try:
        import open_clip_train.data as oc_data
    except ImportError as exc:
        return {"open_clip_error": f"{type(exc).__name__}: {exc} (pip install -e '.[bench]')"}
    _shim_open_clip(oc_data)
    d = b.cfg.data
    resize = T.Resize((d.image_size, d.image_size), interpolation=T.InterpolationMode.BILINEAR)
    augment = [T.RandomAffine(degrees=d.max_rotate_deg, translate=(d.max_translate, d.max_translate),
                              scale=(1 - d.scale_range, 1 + d.scale_range), interpolation=T.InterpolationMode.BILINEAR),
               T.ColorJitter(brightness=d.brightness, contrast=d.contrast)]
    to_tensor = [T.Grayscale(1), T.PILToTensor()]  # uint8 [1, S, S], like ours

    def tokenize(text):  # open_clip's HFTokenizer behaviour: pad to the context length
        return b.tokenizer([text], padding="max_length", truncation=True, max_length=d.max_text_len,
                           return_tensors="pt")["input_ids"]

    def rate(preprocess) -> float:
        """In-process, whole epochs like ours; its second epoch (nothing is cached, so the same as its first)."""
        args = SimpleNamespace(train_data="::".join(b.urls), val_data=None, train_num_samples=_bench_epoch_samples(b),
                               dataset_resampled=False, train_data_upsampling_factors=None, seed=b.cfg.train.seed,
                               batch_size=b.batch, workers=0, world_size=1)
        data = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenize)

        def epoch(e: int):
            data.set_epoch(e)
            return data.dataloader

        return epoch_rates((epoch(e) for e in range(2)), lambda batch: len(batch[0]))[1]

    # As open_clip is used: augmentation in its workers. Same work as ours: augmentation left to the device.
    with_augment, same_work = T.Compose([resize, *augment, *to_tensor]), T.Compose([resize, *to_tensor])
    with one_thread():
        per_worker = best(lambda: rate(with_augment), b.repeat)
        per_worker_same_work = best(lambda: rate(same_work), b.repeat)
    return {"open_clip_samples_s_per_worker": per_worker,
            "open_clip_no_augment_samples_s_per_worker": per_worker_same_work,
            "open_clip_version": _version("open-clip-torch")}


def _shim_open_clip(oc_data) -> None:
    """open-clip-torch 3.3.0 + webdataset 1.0.x: webdataset's tar_file_expander now yields an end-of-shard
    marker `{}` that open_clip's group_by_keys_nothrow cannot take (KeyError: 'fname' at the end of the first
    shard). Drop the marker (eof_value=None, the old behaviour); the per-sample work is unchanged."""
    import functools

    from webdataset.tariterators import tar_file_expander

    if not isinstance(oc_data.tar_file_expander, functools.partial):
        oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
