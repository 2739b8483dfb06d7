"""`vkd-predict --model DIR [--out P.csv] [--mc K] [--batch-size N] PATH...`: an exported model on your own files.

PATH may be files, folders (searched recursively for .png, .jpg, .jpeg, .dcm, .dicom and suffix-less DICOM
files) and globs. Every input gets one CSV row, in input order: `path`, one probability column per label,
`<label>_std` columns with `--mc K`, an `unlike_training` column (why the image is unlike the training data, by
the image statistics the export recorded: vkd_dist/ood.py; empty when it is like it), and a last `error`
column, empty on success. A file that cannot be read
(missing, truncated, a DICOM without pixel data, ...) gets a row whose `error` says why; the others are still
predicted. The exit status is 0 when at least one row has probabilities, 1 when none has, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from tqdm import tqdm

from vkd_dist import RawDefaultsHelpFormatter
from vkd_dist.data.images import ImageError, is_image_file
from vkd_dist.model_dir import CONFIG_FILE, ModelDirError
from vkd_dist.ood import unlike
from vkd_dist.run_dir import RunDir

if TYPE_CHECKING:  # the model stack is imported where used: `vkd-predict --help` answers before torch loads
    from vkd_dist.classifier import VKDImageClassifier


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Files as given (a missing one still gets its row), folders recursively, globs sorted."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            out += [str(p) for p in sorted(path.rglob("*")) if p.is_file() and is_image_file(p)]
        elif not path.exists() and glob.has_magic(spec):
            out += [p for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        else:
            out.append(spec)
    return out


def _load(model: VKDImageClassifier, path: str) -> tuple[Optional[np.ndarray], str]:
    try:
        return model.load_image(path), ""
    except ImageError as exc:
        return None, exc.reason


def _batches(model: VKDImageClassifier, paths: list[str], batch_size: int, workers: int
             ) -> Iterator[list[tuple[str, Optional[np.ndarray], str]]]:
    """(path, image or None, error) in input order, batch by batch; decoding in a thread pool when asked (PIL
    and pydicom's decoders release the GIL for most of the work)."""
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            for i in range(0, len(paths), batch_size):
                chunk = paths[i:i + batch_size]
                yield [(p, *r) for p, r in zip(chunk, pool.map(lambda q: _load(model, q), chunk))]
        return
    for i in range(0, len(paths), batch_size):
        yield [(p, *_load(model, p)) for p in paths[i:i + batch_size]]


def _probability_cells(model: VKDImageClassifier, images: list[np.ndarray], mc: Optional[int]) -> list[list[str]]:
    """Per image, its CSV cells: the probabilities and, with `mc`, their spread."""
    if not images:
        return []
    probs, std = model.predict_images(np.stack(images), mc)
    cells = [[f"{v:.7g}" for v in row] for row in probs]
    if mc and std is not None:
        cells = [row + [f"{v:.7g}" for v in spread] for row, spread in zip(cells, std)]
    return cells


def predict_files(model: VKDImageClassifier, paths: list[str], out, batch_size: int = 32, mc: Optional[int] = None,
                  workers: int = 0, progress: bool = False) -> tuple[int, int]:
    """Write the CSV to the open file `out`; returns (rows with probabilities, rows with an error). An image unlike
    the training data (vkd_dist/ood.py, against the statistics the export recorded) says why in `unlike_training`,
    and a warning counts them."""
    unusual: list[tuple[str, str]] = []
    labels = model.labels
    writer = csv.writer(out)
    writer.writerow(["path", *labels, *([f"{n}_std" for n in labels] if mc else []), "unlike_training", "error"])
    ok = failed = 0
    reference = model.config.get("ood")
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for batch in _batches(model, paths, batch_size, workers):
        cells = iter(_probability_cells(model, [image for _, image, _ in batch if image is not None], mc))
        for path, image, error in batch:
            if image is None:
                writer.writerow([path, *([""] * len(labels) * (2 if mc else 1)), "", error])
                failed += 1
                continue
            why = unlike(image, reference)
            writer.writerow([path, *next(cells), why, ""])
            ok += 1
            if why:
                unusual.append((path, why))
        bar.update(len(batch))
    bar.close()
    if unusual and reference:
        print(f"vkd-predict: warning: {len(unusual)} of {ok} image(s) are unlike the training data (image statistics "
              f"outside the ranges of {reference['num_images']} images of the {reference['source']}; see the "
              f"unlike_training column), e.g. {unusual[0][0]}: "
              f"{unusual[0][1]}", file=sys.stderr)
    return ok, failed


def check_model_dir(model: str) -> Path:
    """--model, in the words vkd-eval uses for --run: a missing directory, or a training run given instead of its
    export, is said so before from_pretrained looks inside."""
    path = Path(model)
    if not path.is_dir():
        raise ModelDirError(f"--model {model}: no such directory")
    if RunDir(path).is_run() and not (path / CONFIG_FILE).is_file():
        from vkd_dist.commands import command

        raise ModelDirError(f"--model {model}: a training run directory, not a model; export it first with "
                            f"{command('vkd-export', model, '--out', 'DIR')}")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-predict", description=__doc__,
                                     formatter_class=RawDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory written by vkd-export")
    parser.add_argument("--out", help="CSV to write (default: standard output)")
    parser.add_argument("--mc", type=int, default=None, metavar="K",
                        help="average K samples of the prior and add a <label>_std column per label")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0 = decode in the main thread)")
    parser.add_argument("--device", default="auto", help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or globs")
    args = parser.parse_args(argv)
    if args.mc is not None and args.mc < 2:
        parser.error("--mc K needs K >= 2 (a spread needs at least two samples)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    paths = expand_inputs(args.paths)
    if not paths:
        print("vkd-predict: error: no input images (give files, folders or globs; folders are searched for "
              ".png .jpg .jpeg .dcm .dicom)", file=sys.stderr)
        return 2
    import torch

    from vkd_dist.classifier import VKDImageClassifier

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = VKDImageClassifier.from_pretrained(check_model_dir(args.model), device)
    except ModelDirError as exc:
        print(f"vkd-predict: error: {exc}", file=sys.stderr)
        return 2
    progress = sys.stderr.isatty()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            ok, failed = predict_files(model, paths, fh, args.batch_size, args.mc, args.workers, progress)
    else:
        ok, failed = predict_files(model, paths, sys.stdout, args.batch_size, args.mc, args.workers, progress)
    print(f"vkd-predict: {ok} predicted, {failed} failed (see the error column)"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
