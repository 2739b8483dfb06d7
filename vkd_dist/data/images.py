"""Robust image loading for the converters: any real-world radiograph file -> uint8 grayscale [H, W].

Handles what real data sets contain: 8- and 16-bit PNG (16-bit data is windowed, not truncated),
RGB / RGBA / LA / palette / CMYK modes, JPEG with EXIF orientation, 150 to 4,300+ pixels a side, and
files that are missing, truncated or not images. A file that cannot be used raises `ImageError` whose
`reason` is "kind: detail" (kind in IMAGE_REJECT_KINDS); converters turn it into a Reject.

Sizing (`resize`), with `size` = the configured image size:
  crop         (default) scale so the shorter side is `size`, then center-crop to `size` x `size`
  pad          scale so the longer side is `size`, then pad to `size` x `size` with black, centered
  keep-aspect  scale so the shorter side is `size`; no crop (the output is not square)
Large JPEGs are decoded with PIL's `draft()` (DCT-domain downscaling by 1/2, 1/4 or 1/8 to no smaller
than the target), which is most of the conversion speed on MIMIC-CXR-JPG's ~2,500 x 3,000 files.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("crop", "pad", "keep-aspect")
IMAGE_REJECT_KINDS = ("missing_image", "unreadable_image", "truncated_image", "too_small", "too_large")
RESAMPLE = Image.BILINEAR  # PIL's resize filters are antialiased on downscaling (support grows with the scale)
MIN_SIDE = 32
WINDOW_PERCENTILES = (0.5, 99.5)  # 16-bit / float data: linear window between these percentiles


class ImageError(Exception):
    """An image file that cannot become a sample; `reason` is "kind: detail" for rejects.csv."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.reason = f"{kind}: {detail}"


def target_size(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """The (w, h) the whole image is scaled to before any crop or pad."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r} (expected one of {', '.join(RESIZE_MODES)})")
    ref = max(width, height) if resize == "pad" else min(width, height)
    scale = size / ref
    return max(1, round(width * scale)), max(1, round(height * scale))


def window_to_uint8(arr: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Linear window of high-bit-depth data onto 0..255 between robust percentiles of the data itself
    (12-bit data stored in 16-bit PNGs would otherwise come out almost black)."""
    arr = arr.astype(np.float32, copy=False)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    sample = finite[:: max(1, finite.size // 1_000_000)]  # percentiles on <= ~1M pixels: fast, stable
    lo, hi = np.percentile(sample, percentiles)
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any PIL mode -> mode "L". Alpha is composited over black; 16-bit / 32-bit / float are windowed."""
    mode = img.mode
    if mode == "L":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(window_to_uint8(np.asarray(img)))
    return img.convert("L")  # RGB, CMYK, YCbCr, 1, ...


def load_image(path: str | Path, size: int = 256, resize: str = "crop", *, min_side: int = MIN_SIDE,
               data: Optional[bytes] = None) -> np.ndarray:
    """Read `path` (or `data`, its bytes) -> uint8 [H, W] sized per `resize`. Raises ImageError."""
    import io

    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r} (expected one of {', '.join(RESIZE_MODES)})")
    path = Path(path)
    if data is None and not path.is_file():
        raise ImageError("missing_image", "file not found" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            src = Image.open(io.BytesIO(data) if data is not None else path)
            with src as img:
                w, h = img.size
                if min(w, h) < min_side:
                    raise ImageError("too_small", f"{w}x{h} pixels (minimum side {min_side})")
                if img.format == "JPEG" and img.mode in ("L", "RGB", "CMYK", "YCbCr"):
                    tw, th = target_size(w, h, size, resize)
                    img.draft("L", (tw, th))  # DCT-domain downscale to >= target; a no-op for small files
                img = ImageOps.exif_transpose(img)  # loads the pixel data
                img.load()
                gray = to_grayscale(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)[:160]) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("unreadable_image", "not a recognised image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        kind = "truncated_image" if ("truncated" in msg or "broken data stream" in msg) else "unreadable_image"
        raise ImageError(kind, f"{type(exc).__name__}: {msg[:160]}") from exc
    return resize_gray(gray, size, resize)


def resize_gray(img: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """Mode-"L" image -> uint8 array sized per `resize` (see the module docstring)."""
    w, h = img.size
    if resize == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (math.floor(left), math.floor(top), math.floor(left) + side, math.floor(top) + side)
        out = img if (side == size and (w, h) == (size, size)) else img.resize((size, size), RESAMPLE, box=box)
        return np.asarray(out, dtype=np.uint8)
    tw, th = target_size(w, h, size, resize)
    out = img if (tw, th) == (w, h) else img.resize((tw, th), RESAMPLE)
    if resize == "keep-aspect":
        return np.asarray(out, dtype=np.uint8)
    canvas = np.zeros((size, size), dtype=np.uint8)
    arr = np.asarray(out, dtype=np.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    canvas[top: top + th, left: left + tw] = arr
    return canvas
