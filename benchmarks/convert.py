"""Conversion throughput of large JPEGs, images/s per core, against the decode+resize+encode ceiling.

    python benchmarks/convert.py --quick            # 12 images
    python benchmarks/convert.py --n 200 --json out.json

Generates N synthetic radiograph-like 8-bit JPEGs (default 2500 x 3000, MIMIC-CXR-JPG-sized) in a temp
folder, then measures on one process (= one core):
  ceiling          PIL only: open, draft() to the target, grayscale, resize + center crop, encode JPEG q95
  ceiling_no_draft the same without draft() (full-resolution decode), for context
  converter        `vkd-data manifest` (convert_manifest, workers=1) on the same files: planning, image
                   loading, text, labels, shard encoding and tar writing included (the one-off
                   ~1.5 s import of webdataset/torch is reported apart as converter_import_startup_s)
Prints a JSON object and a markdown table with the ratio converter / ceiling.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vkd_dist.data.images import RESAMPLE, target_size  # noqa: E402
from vkd_dist.data.schema import JPEG_QUALITY  # noqa: E402


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(40, 220, (24, 20), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.int16) + rng.integers(-6, 7, (height, width), dtype=np.int16)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=95)
        paths.append(path)
    return paths


def ceiling(paths: list[Path], size: int, draft: bool) -> float:
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            w, h = img.size
            if draft:
                img.draft("L", target_size(w, h, size, "crop"))
            img = img.convert("L")
            w, h = img.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            out = img.resize((size, size), RESAMPLE, box=box)
            out.save(io.BytesIO(), "JPEG", quality=JPEG_QUALITY)
    return time.perf_counter() - start


def converter(paths: list[Path], folder: Path, size: int) -> float:
    import vkd_dist.data.shards  # noqa: F401  (imports webdataset -> torch, ~1.5 s: startup, timed apart)
    from vkd_dist.data.sources import ConvertOptions
    from vkd_dist.data.sources.manifest import convert_manifest

    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "manifest.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "text", "patient_id", "finding"])
        for i, p in enumerate(paths):
            w.writerow([str(p), "FINDINGS: The lungs are clear. IMPRESSION: Normal.", f"P{i}", "No Finding"])
    start = time.perf_counter()
    meta = convert_manifest(csv_path, folder / "out", opts=ConvertOptions(image_size=size), label_col="finding",
                            val_frac=0.0, test_frac=0.0, workers=1, samples_per_shard=10_000, progress=False)
    seconds = time.perf_counter() - start
    assert meta["splits"]["train"]["num_samples"] == len(paths), meta["rejects_by_reason"]
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="12 images")
    ap.add_argument("--width", type=int, default=2500)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many interleaved runs")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    n = 12 if args.quick else args.n
    with tempfile.TemporaryDirectory(prefix="vkd-bench-convert-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = make_images(folder, n, args.width, args.height)
        gen = time.perf_counter() - t0
        mb = sum(p.stat().st_size for p in paths) / n / 1e6
        ceiling(paths[:2], args.size, True)  # warm the page cache and imports
        t0 = time.perf_counter()
        import vkd_dist.data.shards  # noqa: F401
        import vkd_dist.data.sources.manifest  # noqa: F401
        startup = time.perf_counter() - t0
        c, c_full, conv = float("inf"), float("inf"), float("inf")
        for r in range(args.repeat):  # interleaved, best of --repeat: the machine may be shared
            c = min(c, ceiling(paths, args.size, True))
            c_full = min(c_full, ceiling(paths, args.size, False))
            conv = min(conv, converter(paths, folder / f"run{r}", args.size))
    res = {"n": n, "repeat": args.repeat, "source": f"{args.width}x{args.height} 8-bit JPEG q95, {mb:.2f} MB each",
           "output": f"{args.size}x{args.size} JPEG q{JPEG_QUALITY}", "generate_s": round(gen, 2),
           "ceiling_img_s_per_core": round(n / c, 1), "ceiling_no_draft_img_s_per_core": round(n / c_full, 1),
           "converter_img_s_per_core": round(n / conv, 1), "converter_over_ceiling": round(c / conv, 3),
           "converter_import_startup_s": round(startup, 2)}
    print(json.dumps(res, indent=2))
    print("\n| measure (1 core) | images/s |\n|---|---|")
    print(f"| ceiling: PIL decode (draft) + resize + encode | {res['ceiling_img_s_per_core']} |")
    print(f"| ceiling without draft (full decode) | {res['ceiling_no_draft_img_s_per_core']} |")
    print(f"| converter (`vkd-data manifest`, workers=1) | {res['converter_img_s_per_core']} |")
    print(f"| converter / ceiling | {res['converter_over_ceiling']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
