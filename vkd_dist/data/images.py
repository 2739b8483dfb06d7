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

DICOM (the `DICM` magic at byte 128, or a .dcm / .dicom suffix) is read with pydicom: its pixel
handlers decode the compressed transfer syntaxes (JPEG baseline via Pillow, JPEG Lossless / JPEG-LS via
pylibjpeg-libjpeg, RLE natively), then the Modality LUT / rescale and the first VOI LUT / window are
applied and MONOCHROME1 is inverted. The 8-bit result matches a PNG of the same numbers: plain 8-bit
data is used as is, a VOI window's output range maps linearly onto 0..255, and anything else (12/16-bit,
rescaled) gets the same percentile window as a 16-bit PNG. Multi-frame files: the first frame only.
Then the same sizing as every other file.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("crop", "pad", "keep-aspect")
IMAGE_REJECT_KINDS = ("missing_image", "unreadable_image", "truncated_image", "too_small", "too_large")
# PIL's resize filters are antialiased on downscaling (support grows with the scale).
RESAMPLE = Image.Resampling.BILINEAR
MIN_SIDE = 32
WINDOW_PERCENTILES = (0.5, 99.5)  # 16-bit / float data: linear window between these percentiles
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES


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
    # Integer data (every PNG, most DICOM) has no NaN or inf: skip those scans and copies, a third of the
    # time of a 16-bit 2k x 2k image. Float data goes through float32 as before, so results are unchanged.
    arr = np.asarray(arr)
    all_finite = arr.dtype.kind in "iub"
    if not all_finite:
        arr = arr.astype(np.float32, copy=False)
        finite_mask = np.isfinite(arr)
        all_finite = bool(finite_mask.all())
    finite = arr.ravel() if all_finite else arr[finite_mask]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    sample = finite[:: max(1, finite.size // 1_000_000)].astype(np.float32)  # percentiles on <= ~1M pixels
    lo, hi = np.percentile(sample, percentiles)
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = arr.astype(np.float64) if all_finite else np.nan_to_num(arr, nan=lo).astype(np.float64)
    out -= lo  # in place, float64 as the percentiles: one temporary instead of four
    out *= 255.0 / (hi - lo)
    out += 0.5
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


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


def is_image_file(path: str | Path) -> bool:
    """For folder scans: a .png / .jpg / .jpeg / .dcm / .dicom name (any case), or a DICOM file named
    without an image suffix (scanner exports: IM0001, or UID names like 1.2.840.113619.2.5.504)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR" or (suffix and not suffix[1:].isdigit()):
        return False  # the media index has no pixels; other suffixes (.txt, .csv, ...) are not images
    return _has_dicom_magic(path)


def _has_dicom_magic(path: Path, data: Optional[bytes] = None) -> bool:
    """True if bytes 128..132 are b"DICM" (the Part 10 preamble)."""
    if data is not None:
        return data[128:132] == b"DICM"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def load_image(path: str | Path, size: int = 256, resize: str = "crop", *, min_side: int = MIN_SIDE,
               data: Optional[bytes] = None) -> np.ndarray:
    """Read `path` (or `data`, its bytes) -> uint8 [H, W] sized per `resize`. Raises ImageError.

    DICOM is detected by its magic (also for `data`) or a .dcm / .dicom suffix; a multi-frame DICOM
    gives its first frame. See the module docstring for how DICOM values become 8 bits."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r} (expected one of {', '.join(RESIZE_MODES)})")
    path = Path(path)
    if data is None and not path.is_file():
        raise ImageError("missing_image", "file not found" if not path.exists() else "not a regular file")
    magic = _has_dicom_magic(path, data)
    if magic or path.suffix.lower() in DICOM_SUFFIXES:
        # force=True only when just the suffix says DICOM (files written without the 128-byte preamble)
        return resize_gray(_load_dicom(path, data, min_side=min_side, force=not magic), size, resize)
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


_TRUNCATION_HINTS = ("truncated", "less than expected", "end of file", "unpack requires a buffer")


def _pydicom_errors() -> tuple:
    """What pydicom raises for corrupt files and pixel data (its decoders wrap plugin failures in
    RuntimeError). Not TypeError / AttributeError: those stay programming errors, except around pydicom's
    own decode call, where AttributeError means a missing group 0028 element."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (InvalidDicomError, BytesLengthException, ValueError, NotImplementedError, RuntimeError, OSError,
            EOFError, struct.error)


def _dicom_error(exc: BaseException, what: str) -> ImageError:
    msg = " ".join(str(exc).split())  # plugin failures span several lines
    truncated = isinstance(exc, EOFError) or any(h in msg.lower() for h in _TRUNCATION_HINTS)
    return ImageError("truncated_image" if truncated else "unreadable_image",
                      f"{what}: {type(exc).__name__}: {msg[:200]}")


def _load_dicom(path: Path, data: Optional[bytes], *, min_side: int, force: bool) -> Image.Image:
    """A DICOM file -> mode-"L" image, before sizing. Raises ImageError."""
    import pydicom

    errors = _pydicom_errors()
    try:
        # pydicom warns (and logs to its "pydicom" logger) when a file ends inside a sequence or the
        # encapsulated pixel data; the element is then silently missing, so remember that it happened
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, force=force)
        ended_early = any("end of file" in str(w.message).lower() for w in caught)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if ended_early:
                raise ImageError("truncated_image", "DICOM file ends before its pixel data is complete")
            if force:
                raise ImageError("unreadable_image", "not a DICOM file (no DICM preamble) or DICOM has no pixel data")
            raise ImageError("unreadable_image", "DICOM has no pixel data")
        info = _dicom_pixel_info(ds)
    except ImageError:
        raise
    except errors as exc:
        raise _dicom_error(exc, "unreadable DICOM") from exc

    rows, cols = info["rows"], info["cols"]
    if min(rows, cols) < min_side:
        raise ImageError("too_small", f"{cols}x{rows} pixels (minimum side {min_side})")
    limit = Image.MAX_IMAGE_PIXELS  # the same decompression-bomb limit as PIL applies to PNG / JPEG
    if limit is not None and rows * cols > limit:
        raise ImageError("too_large", f"DICOM {cols}x{rows} = {rows * cols} pixels exceeds limit of {limit} pixels")
    arr = _dicom_first_frame(ds, info)
    try:
        return _dicom_to_gray(arr, ds, info)
    except errors as exc:
        raise _dicom_error(exc, "DICOM pixel processing failed") from exc


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _usable_lut(seq, entry_bits: tuple) -> bool:
    """A Modality / VOI LUT Sequence whose first item pydicom can apply without tripping over it."""
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence

    item = seq[0] if isinstance(seq, Sequence) and len(seq) else None
    if item is None:
        return False
    descriptor, lut = item.get("LUTDescriptor"), item.get("LUTData")
    if not (isinstance(descriptor, (list, tuple, MultiValue)) and len(descriptor) == 3
            and all(isinstance(v, int) for v in descriptor) and descriptor[2] in entry_bits):
        return False
    # pydicom indexes the data by the declared entry count (0 means 65536); OW data is 16-bit words
    n_data = len(lut) // 2 if isinstance(lut, bytes) else len(lut) if isinstance(lut, (list, MultiValue)) else 1
    return lut is not None and n_data >= (descriptor[0] or 2 ** 16)


def _dicom_pixel_info(ds) -> dict:
    """The Image Pixel module values we rely on, validated; ImageError when missing or malformed.
    Empty or invalid display settings (window, VOI LUT) are dropped from `ds` instead."""
    from pydicom.multival import MultiValue
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    info: dict = {}
    for key, kw in (("rows", "Rows"), ("cols", "Columns"), ("bits_allocated", "BitsAllocated"),
                    ("samples", "SamplesPerPixel"), ("pi", "PhotometricInterpretation")):
        value = ds.get(kw)
        if not (isinstance(value, str) if key == "pi" else isinstance(value, int) and _is_number(value)):
            raise ImageError("unreadable_image", f"DICOM has a missing or invalid {kw}: {value!r:.40}")
        info[key] = value
    if min(info["rows"], info["cols"]) < 1:
        raise ImageError("unreadable_image", f"DICOM has no pixels ({info['cols']}x{info['rows']})")
    for kw in ("BitsStored", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames"):
        value = ds.get(kw)  # optional here; pydicom compares them as numbers
        if value is not None and not (isinstance(value, int) and _is_number(value)):
            raise ImageError("unreadable_image", f"DICOM has an invalid {kw}: {value!r:.40}")
    info["bits_stored"] = ds.get("BitsStored") or info["bits_allocated"]
    info["pi"] = info["pi"].strip().upper()
    for kw in ("RescaleSlope", "RescaleIntercept"):
        value = ds[kw].value if kw in ds else 0.0
        if value in (None, ""):
            del ds[kw]  # empty: as if absent (pydicom would multiply by None)
        elif not _is_number(value):
            raise ImageError("unreadable_image", f"DICOM has an invalid {kw}: {value!r:.40}")
    # LUT bits per entry: 8 or 16 for a Modality LUT (PS3.3 C.11.1.1.1), 8 or 10..16 for a VOI LUT
    if ds.get("ModalityLUTSequence") and not _usable_lut(ds.ModalityLUTSequence, (8, 16)):
        raise ImageError("unreadable_image", "DICOM has an invalid Modality LUT")  # values mean nothing without it
    if ds.get("VOILUTSequence") and not _usable_lut(ds.VOILUTSequence, (8, *range(10, 17))):
        del ds.VOILUTSequence  # a broken display LUT is not a broken image: display without it
    for kw in ("WindowCenter", "WindowWidth"):
        value = ds[kw].value if kw in ds else 0.0
        if not (_is_number(value) or (isinstance(value, (list, tuple, MultiValue)) and len(value)
                                      and all(map(_is_number, value)))):
            del ds[kw]  # likewise an empty or non-numeric window
    if "TransferSyntaxUID" not in ds.file_meta:
        # headerless files (read with force=True): the encoding pydicom guessed is the transfer syntax
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ts = ds.file_meta.TransferSyntaxUID
    if not isinstance(ts, str) or not ts.strip():
        raise ImageError("unreadable_image", f"DICOM has an invalid TransferSyntaxUID: {ts!r:.60}")
    info["ts"] = UID(ts)
    return info


def _dicom_first_frame(ds, info: dict) -> np.ndarray:
    """Decode frame 0 with pydicom's pixel handlers (YBR is converted to RGB). Raises ImageError."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    ts = info["ts"]
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise ImageError("unreadable_image", f"no pixel decoder for transfer syntax {ts.name} ({ts})") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageError("unreadable_image", f"no installed decoder for transfer syntax {ts.name} ({missing})"[:300])
    # Pillow first for baseline JPEG: the very decoder (libjpeg-turbo) the .jpg path uses, so a DICOM-wrapped
    # JPEG gives the same pixels as the .jpg (pylibjpeg's decoder differs by 1 in places)
    plugins = ["pillow", ""] if ts == JPEGBaseline8Bit and "pillow" in decoder.available_plugins else [""]
    for i, plugin in enumerate(plugins):
        try:
            ds.pixel_array_options(index=0, decoding_plugin=plugin)  # decode only the first frame
            arr = ds.pixel_array
            break
        except (AttributeError, *_pydicom_errors()) as exc:
            # a JPEG that Pillow finds truncated is rejected as a truncated .jpg is (pylibjpeg would
            # silently fill in the missing part); other Pillow failures get the remaining plugins
            if i + 1 == len(plugins) or "truncated" in str(exc).lower():
                raise _dicom_error(exc, f"cannot decode {ts.name} pixel data") from exc
    if arr.ndim == (3 if info["samples"] == 1 else 4):  # a frame axis despite index=0
        arr = arr[0]
    if arr.shape[:2] != (info["rows"], info["cols"]):
        raise ImageError("unreadable_image", f"decoded DICOM frame is {arr.shape}, not {info['rows']}x{info['cols']}")
    return arr


def _dicom_to_gray(arr: np.ndarray, ds, info: dict) -> Image.Image:
    """Decoded pixels -> mode-"L" image the way a PNG of the same numbers is read (module docstring)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

    pi = info["pi"]
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # RGB (pydicom already converted YBR_FULL / YBR_FULL_422), palette output
        if arr.dtype != np.uint8:  # a 16-bit RGB PNG is read by PIL as 8-bit RGB too
            top = 65535 if pi == "PALETTE COLOR" else 2 ** info["bits_stored"] - 1
            arr = np.clip(arr.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB").convert("L")

    rescaled = bool(ds.get("ModalityLUTSequence")) or (
        ("RescaleSlope" in ds and "RescaleIntercept" in ds)
        and (float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0))
    if rescaled:  # skip the identity rescale many 8-bit files carry: it would only make the values float
        arr = apply_modality_lut(arr, ds)
    out_range = None  # (value shown black, value shown white) of an applied VOI LUT / window
    monochrome = pi in ("MONOCHROME1", "MONOCHROME2")
    voi_item = ds.VOILUTSequence[0] if monochrome and ds.get("VOILUTSequence") else None
    has_lut = voi_item is not None and None not in (voi_item.get("LUTDescriptor"), voi_item.get("LUTData"))
    has_window = monochrome and None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if has_lut or has_window:
        try:
            voi = apply_voi_lut(arr, ds)  # the LUT when both are present, else the first window
            if has_lut and voi_item is not None:
                # the LUT's entries are 0..2**bits-1 for its declared bits per entry; encoders often declare
                # 16 for 12-bit entries, so use the width its largest entry needs (at least 8 bits)
                first, n = voi_item.LUTDescriptor[1], voi_item.LUTDescriptor[0] or 2 ** 16
                top = int(np.max(apply_voi_lut(np.arange(first, first + n), ds)))
                bits = min(int(voi_item.LUTDescriptor[2]), max(8, top.bit_length()))
                out_range = (0.0, float(2 ** bits - 1))
            else:
                # the window's output range is pydicom's (stored value range after rescale, see
                # apply_windowing); -inf / +inf fall below / above any window, giving its two ends
                lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
                out_range = (float(lo), float(hi))
            if out_range[0] == out_range[1]:
                out_range = None
            else:
                arr = voi
        except ValueError:
            out_range = None  # an invalid window (width < 1, unknown function) is not a broken image

    if out_range is not None:
        lo, hi = out_range
        arr = arr.astype(np.float64)
        if pi == "MONOCHROME1":
            arr = lo + hi - arr  # invert within the window's output range
        out = (arr - lo) * (255.0 / (hi - lo))  # works for hi < lo too (negative rescale slope)
        return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))

    bits = info["bits_stored"]
    plain = (not rescaled and bits <= 8 and np.issubdtype(arr.dtype, np.integer)
             and arr.size > 0 and arr.min() >= 0 and arr.max() <= 2 ** bits - 1)
    if plain:
        top = 2 ** bits - 1
        if pi == "MONOCHROME1":
            arr = top - arr.astype(np.int32)  # invert within the stored range, as a display does
        if bits < 8:  # 1/2/4-bit data is scaled to 0..255, as PIL reads 1/2/4-bit grayscale PNGs
            return Image.fromarray(((arr.astype(np.int32) * 255 + top // 2) // top).astype(np.uint8))
        return Image.fromarray(arr.astype(np.uint8))
    if pi == "MONOCHROME1":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size:
            arr = (finite.max() + finite.min()) - arr  # any c - x gives the same percentile window
    return Image.fromarray(window_to_uint8(arr))  # as a 16-bit PNG of these values (to_grayscale)


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
