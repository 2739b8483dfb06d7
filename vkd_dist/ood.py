"""Is an input image like the images the model was trained and validated on? A deliberately simple check on three
statistics of the preprocessed image (uint8 [S, S], exactly what the model reads):

    mean   mean intensity                         a blank, inverted or wrongly windowed image moves it
    std    intensity spread (contrast)            a flat or saturated image moves it
    edge   mean absolute difference of neighbouring pixels (x and y): high-frequency energy; noise, text, photos
           of screens and heavy JPEG artefacts move it, a radiograph's smooth anatomy keeps it low

`vkd-export` records each statistic's range over (up to REFERENCE_IMAGES of) the run's validation images, from
the 0.5th to the 99.5th percentile, widened on each side by MARGIN of its width; `vkd-predict` flags an image
outside any range. Why this and not a feature-space distance (e.g. Mahalanobis distance of the prior's mean):
it needs no model pass at export, is the same for every objective, reads as a reason a user can check ("edge
170 > 31"), and catches the failures met in practice (noise, blank, non-radiograph inputs). It does not catch an
image of another site that looks like a radiograph: the model card says performance elsewhere is unknown.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import Optional

import numpy as np

STATS = ("mean", "std", "edge")
REFERENCE_IMAGES = 500
QUANTILES = (0.005, 0.995)
MARGIN = 0.5


def image_stats(image: np.ndarray) -> dict[str, float]:
    """The statistics of a uint8 [S, S] image as the model reads it."""
    x = image.astype(np.float32)
    edge = float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2
    return {"mean": float(x.mean()), "std": float(x.std()), "edge": edge}


def reference(images: Iterable[np.ndarray], source: str) -> Optional[dict]:
    """The ranges `unlike` checks, over `images` (None when there are none)."""
    rows = [image_stats(image) for image in images]
    if not rows:
        return None
    ranges = {}
    for name in STATS:
        low, high = np.quantile([row[name] for row in rows], QUANTILES)
        pad = MARGIN * (high - low)
        ranges[name] = [round(float(low - pad), 4), round(float(high + pad), 4)]
    return {"source": source, "num_images": len(rows), "ranges": ranges,
            "rule": f"{QUANTILES[0] * 100:g}th-{QUANTILES[1] * 100:g}th percentile of the reference images, widened "
                    f"by {MARGIN:g} of its width on each side (vkd_dist/ood.py)"}


def unlike(image: np.ndarray, ref: Optional[dict]) -> str:
    """Why `image` is unlike the reference ("" when it is like it, or there is no reference)."""
    if not ref:
        return ""
    stats = image_stats(image)
    reasons = []
    for name, (low, high) in ref["ranges"].items():
        if stats[name] < low:
            reasons.append(f"{name} {stats[name]:.1f} < {low:.1f}")
        elif stats[name] > high:
            reasons.append(f"{name} {stats[name]:.1f} > {high:.1f}")
    return "; ".join(reasons)


def split_images(shards: Iterable[str], size: int, limit: int = REFERENCE_IMAGES) -> Iterator[np.ndarray]:
    """Up to `limit` images of a split's shards, as the model reads them (decoded, fitted to `size`)."""
    from vkd_dist.data.pipeline import fit
    from vkd_dist.data.schema import IMAGE_KEYS, decode_image

    count = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if count >= limit:
                    return
                if member.isfile() and member.name.rsplit(".", 1)[-1] in IMAGE_KEYS:
                    data = tar.extractfile(member)
                    if data is not None:
                        yield fit(decode_image(data.read()), size)
                        count += 1
