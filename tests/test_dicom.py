"""vkd_dist.data.images on DICOM: the same pixels as PNG / JPEG input, pydicom's LUT pipeline, bad files as ImageError.

Every DICOM here is written with pydicom from a synthetic radiograph-like array; the PNG / JPEG it is
compared with holds the same numbers, so equality means DICOM input gets exactly the converters' preprocessing.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    HTJ2K,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from vkd_dist.data.images import ImageError, is_image_file, load_image  # noqa: E402

SIZE = 64
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _image(h=80, w=96, seed=0):
    """uint8 [h, w]: a horizontal gradient, a bright disc, a dark bar and noise (seeded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 40 + 160 * xx / (w - 1)
    img = np.where((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 5) ** 2, 235.0, img)
    img[h // 5: h // 5 + 6, w // 2:] = 8
    img = img + rng.normal(0, 12, (h, w))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _dataset(arr, *, pi="MONOCHROME2", bits_stored=None, ts=ExplicitVRLittleEndian, **elements):
    """A minimal DX-like Part 10 dataset holding `arr` ([rows, cols] or [frames, rows, cols]) uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    rgb = pi == "RGB"
    frames = arr.ndim == (4 if rgb else 3)
    ds.Rows, ds.Columns = arr.shape[1:3] if frames else arr.shape[:2]
    if frames:
        ds.NumberOfFrames = arr.shape[0]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = pi
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(arr, path):
    Image.fromarray(arr).save(path)
    return path


def _load(path, **kw):
    return load_image(path, SIZE, "crop", **kw)


def test_8bit_monochrome2_equals_png(tmp_path):
    img = _image()
    dcm = _load(_save(_dataset(img), tmp_path / "a.dcm"))
    assert dcm.shape == (SIZE, SIZE) and dcm.dtype == np.uint8
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "a.png")))


@pytest.mark.parametrize("elements", [
    {"RescaleSlope": 1, "RescaleIntercept": 0, "RescaleType": "US"},  # the identity rescale many files carry
    {"WindowCenter": 128, "WindowWidth": 0},  # an invalid window (LINEAR needs width >= 1) is ignored
    {"WindowCenter": 128, "WindowWidth": 256},  # the full 8-bit window: output range 0..255 -> 0..255, x -> x
])
def test_8bit_identity_rescale_or_window_equals_png(tmp_path, elements):
    img = _image()
    dcm = _load(_save(_dataset(img, **elements), tmp_path / "a.dcm"))
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "a.png")))


@pytest.mark.parametrize("lo,hi", [(0, 255), (10, 240)])
def test_monochrome1_is_inverted_within_stored_range(tmp_path, lo, hi):
    # also for data that does not reach 0 / 255: inversion is 255 - x (the 8-bit range), not max + min - x
    img = (lo + _image().astype(np.float64) * (hi - lo) / 255).round().astype(np.uint8)
    dcm = _load(_save(_dataset(255 - img, pi="MONOCHROME1"), tmp_path / "m1.dcm"))
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "m1.png")))


def _values_12bit(seed=1):
    rng = np.random.default_rng(seed)
    return (_image().astype(np.uint16) * 16 + rng.integers(0, 16, (80, 96))).astype(np.uint16)  # 0..4095


@pytest.mark.parametrize("slope,intercept,offset", [(1, -1024, 1024), (2, 0, 0), (2, -1024, 512)])
def test_16bit_rescale_equals_16bit_png(tmp_path, slope, intercept, offset):
    values = _values_12bit()
    rescaled = values.astype(np.int64) * slope
    stored = ((rescaled - intercept) // slope).astype(np.uint16)  # stored * slope + intercept == rescaled
    assert np.array_equal(stored.astype(np.int64) * slope + intercept, rescaled) and stored.min() >= offset
    ds = _dataset(stored, RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
    png = tmp_path / "r.png"
    Image.fromarray(rescaled.astype(np.uint16)).save(png)
    assert Image.open(png).mode == "I;16"
    dcm = _load(_save(ds, tmp_path / "r.dcm"))
    assert np.array_equal(dcm, _load(png))
    assert dcm.max() >= 250 and dcm.min() <= 5  # percentile-windowed like the PNG, not truncated


def test_16bit_monochrome1_is_inverted(tmp_path):
    values = _values_12bit()
    mono2 = _load(_save(_dataset(values, bits_stored=12), tmp_path / "m2.dcm"))
    mono1 = _load(_save(_dataset(4095 - values, pi="MONOCHROME1", bits_stored=12), tmp_path / "m1.dcm"))
    # inverted (max + min - x) then the same percentile window: the values' window, up to percentile
    # interpolation / rounding of 0.5 steps, which reaches 1 level at most
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1
    assert mono1.mean() == pytest.approx(mono2.mean(), abs=0.5)


def _jpeg_dataset(img, jpeg):
    ds = _dataset(img, ts=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def _jpeg_bytes(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_jpeg_baseline_equals_jpg(tmp_path):
    img = _image()
    jpeg = _jpeg_bytes(img)
    (tmp_path / "j.jpg").write_bytes(jpeg)
    dcm = _load(_save(_jpeg_dataset(img, jpeg), tmp_path / "j.dcm"))
    # Exactly equal: the DICOM path decodes baseline JPEG with Pillow (libjpeg-turbo), like the .jpg path;
    # pydicom's default first choice, pylibjpeg, differs by 1 in places. At 96x80 -> 64 there is no draft
    # downscale on the .jpg path either.
    assert np.array_equal(dcm, _load(tmp_path / "j.jpg"))


def test_rle_lossless_equals_png(tmp_path):
    img = _image()
    ds = _dataset(img)
    ds.compress(RLELossless, img)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    dcm = _load(_save(ds, tmp_path / "rle.dcm"))
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "rle.png")))


@pytest.mark.skipif(not features.check("jpg_2000"), reason="Pillow built without OpenJPEG")
def test_jpeg2000_lossless_equals_png(tmp_path):
    # No encoder for JPEG Lossless (process 14) is installed, so that transfer syntax is not tested here;
    # Pillow does encode lossless JPEG 2000, which pydicom decodes via Pillow too.
    img = _image()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
    ds = _dataset(img, ts=JPEG2000Lossless)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    dcm = _load(_save(ds, tmp_path / "j2k.dcm"))
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "j2k.png")))


PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped in the wheel: no download


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"])
def test_real_files_same_image_in_every_transfer_syntax(name):
    # pydicom's own 64x64 signed 16-bit MR in several encodings; JPEG-LS lossless goes through
    # pylibjpeg-libjpeg (the handler JPEG Lossless CR/DX files also need), which nothing here can encode
    if not (PYDICOM_FILES / name).is_file() or not (PYDICOM_FILES / "MR_small.dcm").is_file():
        pytest.skip("pydicom's bundled test files are not installed")
    if name == "MR_small_jp2klossless.dcm" and not features.check("jpg_2000"):
        pytest.skip("Pillow built without OpenJPEG")
    reference = load_image(PYDICOM_FILES / "MR_small.dcm", 48, "crop")
    assert reference.max() - reference.min() > 150  # percentile-windowed, not flat
    assert np.array_equal(load_image(PYDICOM_FILES / name, 48, "crop"), reference)


def test_rgb_equals_rgb_png(tmp_path):
    img = _image()
    rgb = np.stack([img, 255 - img, img // 2], -1)
    dcm = _load(_save(_dataset(rgb, pi="RGB"), tmp_path / "rgb.dcm"))
    assert np.array_equal(dcm, _load(_png(rgb, tmp_path / "rgb.png")))


def _ramp_dataset(**elements):
    """64 x 64 holding every 12-bit value once (row-major ramp 0..4095), so no resize happens at SIZE."""
    return _dataset(np.arange(4096, dtype=np.uint16).reshape(64, 64), bits_stored=12, **elements)


def _expected_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window by hand, output 0..255 (the 12-bit output range scaled)."""
    c, w = center - 0.5, width - 1
    y = ((x - c) / w + 0.5) * 255
    y = np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))
    return np.floor(y + 0.5)


@pytest.mark.parametrize("pi", ["MONOCHROME2", "MONOCHROME1"])
def test_window_maps_linearly_onto_0_255(tmp_path, pi):
    x = np.arange(4096, dtype=np.float64).reshape(64, 64)
    out = load_image(_save(_ramp_dataset(WindowCenter=2048, WindowWidth=1024, PhotometricInterpretation=pi),
                           tmp_path / "w.dcm"), SIZE, "crop").astype(int)
    if pi == "MONOCHROME1":
        out = 255 - out  # inverted within the window's output range
    assert np.all(out[x <= 1536] == 0) and np.all(out[x >= 2560] == 255)  # below / above the window
    assert np.abs(out - _expected_window(x, 2048, 1024)).max() <= 1  # rounding at exact .5 steps only
    inside = out[(x > 1536) & (x < 2560)]
    assert np.all(np.diff(inside) >= 0)  # monotonic inside the window
    # a 1023-wide window spread over 256 levels: about 4 input values a level, all levels used
    assert len(np.unique(inside)) >= 250


def test_window_after_rescale_and_first_of_several(tmp_path):
    # Hounsfield-like: stored 0..4095 with intercept -1024; window in rescaled units; the first window is used
    ds = _ramp_dataset(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[1024, 0], WindowWidth=[1024, 100])
    out = load_image(_save(ds, tmp_path / "hu.dcm"), SIZE, "crop").astype(int)
    hu = np.arange(4096, dtype=np.float64).reshape(64, 64) - 1024
    assert np.abs(out - _expected_window(hu, 1024, 1024)).max() <= 1


def test_voi_lut_sequence_16bit_declared_12bit_entries(tmp_path):
    # a VOI LUT that declares 16 bits per entry but holds 12-bit entries (a common encoder quirk):
    # its output 0..4095 maps onto 0..255, not onto 0..16
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", list(range(4095, -1, -1)))  # an inverting LUT
    ds = _ramp_dataset()
    ds.VOILUTSequence = [item]
    out = load_image(_save(ds, tmp_path / "lut.dcm"), SIZE, "crop").astype(int)
    expected = np.floor((4095 - np.arange(4096).reshape(64, 64)) * 255 / 4095 + 0.5)
    assert np.abs(out - expected).max() <= 1 and out[0, 0] == 255 and out[-1, -1] == 0


def test_multiframe_uses_first_frame(tmp_path):
    img = _image()
    frames = np.stack([img, 255 - img, np.zeros_like(img)])
    dcm = _load(_save(_dataset(frames), tmp_path / "mf.dcm"))
    assert np.array_equal(dcm, _load(_png(img, tmp_path / "mf.png")))


def test_data_bytes_same_as_path(tmp_path):
    img = _image()
    path = _save(_dataset(255 - img, pi="MONOCHROME1"), tmp_path / "b.dcm")
    from_path = _load(path)
    assert np.array_equal(load_image("upload", SIZE, "crop", data=path.read_bytes()), from_path)  # no suffix: magic
    assert np.array_equal(load_image(path, SIZE, "crop", data=path.read_bytes()), from_path)


def test_headerless_dcm_read_by_suffix(tmp_path):
    # no 128-byte preamble / file meta (implicit VR little endian dataset only): read because of .dcm
    img = _image()
    ds = _dataset(img)
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    assert buf.getvalue()[128:132] != b"DICM"
    (tmp_path / "raw.dcm").write_bytes(buf.getvalue())
    assert np.array_equal(_load(tmp_path / "raw.dcm"), _load(_png(img, tmp_path / "raw.png")))
    (tmp_path / "raw").write_bytes(buf.getvalue())
    with pytest.raises(ImageError):  # without the suffix nothing says DICOM
        _load(tmp_path / "raw")


def _raises(path, **kw) -> ImageError:
    with pytest.raises(ImageError) as err:
        load_image(path, SIZE, "crop", **kw)
    return err.value


def test_no_pixel_data(tmp_path):
    ds = _dataset(_image())
    del ds.PixelData
    err = _raises(_save(ds, tmp_path / "np.dcm"))
    assert err.kind == "unreadable_image" and "no pixel data" in err.reason


def test_truncated_pixel_data(tmp_path):
    raw = _save(_dataset(_image()), tmp_path / "t.dcm").read_bytes()
    (tmp_path / "t.dcm").write_bytes(raw[: len(raw) - 3000])
    err = _raises(tmp_path / "t.dcm")
    assert err.kind == "truncated_image" and "less than expected" in err.reason


def test_truncated_encapsulated_pixel_data(tmp_path):
    img = _image()
    ds = _dataset(img)
    ds.compress(RLELossless, img)
    raw = _save(ds, tmp_path / "t.dcm").read_bytes()
    (tmp_path / "t.dcm").write_bytes(raw[: len(raw) - 500])  # cut inside the RLE fragment
    assert _raises(tmp_path / "t.dcm").kind in ("truncated_image", "unreadable_image")


def test_truncated_jpeg_fragment_rejected_like_truncated_jpg(tmp_path):
    img = _image()
    half = _jpeg_bytes(img)[:1500]
    (tmp_path / "t.jpg").write_bytes(half)
    assert _raises(tmp_path / "t.jpg").kind == "truncated_image"
    # pylibjpeg would decode this, filling in the missing rows; the DICOM path rejects it like the .jpg
    err = _raises(_save(_jpeg_dataset(img, half), tmp_path / "t.dcm"))
    assert err.kind == "truncated_image" and "JPEG Baseline" in err.reason


def test_garbage_with_dcm_suffix(tmp_path):
    (tmp_path / "g.dcm").write_bytes(b"this is not a DICOM file at all\n" * 20)
    assert _raises(tmp_path / "g.dcm").kind == "unreadable_image"
    junk = b"\0" * 128 + b"DICM" + bytes(np.random.default_rng(3).integers(0, 256, 600, dtype=np.uint8))
    (tmp_path / "g2.dcm").write_bytes(junk)
    assert _raises(tmp_path / "g2.dcm").kind in ("truncated_image", "unreadable_image")


@pytest.mark.parametrize("ts", [MPEG2MPML, HTJ2K])
def test_transfer_syntax_without_decoder(tmp_path, ts):
    if ts == HTJ2K and pydicom.pixels.get_decoder(HTJ2K).is_available:
        pytest.skip("an HTJ2K decoder (pylibjpeg-openjpeg) is installed here")
    ds = _dataset(_image(), ts=ts)
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    err = _raises(_save(ds, tmp_path / "x.dcm"))
    assert err.kind == "unreadable_image" and ts.name in err.reason


def test_programming_errors_are_not_swallowed(tmp_path, monkeypatch):
    import vkd_dist.data.images as images

    def broken(arr, *args):
        raise TypeError("a bug in our code")

    monkeypatch.setattr(images, "window_to_uint8", broken)
    with pytest.raises(TypeError, match="a bug in our code"):
        _load(_save(_dataset(_values_12bit()), tmp_path / "bug.dcm"))


def test_too_small_and_missing(tmp_path):
    err = _raises(_save(_dataset(np.zeros((20, 96), np.uint8)), tmp_path / "s.dcm"))
    assert err.kind == "too_small" and "96x20" in err.reason
    assert _raises(tmp_path / "nope.dcm").kind == "missing_image"


def test_too_large_checks_rows_columns(tmp_path, monkeypatch):
    path = _save(_dataset(_image()), tmp_path / "big.dcm")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 80 - 1)
    assert _raises(path).kind == "too_large"


def test_is_image_file(tmp_path):
    for name in ("a.png", "b.JPG", "c.jpeg", "d.DCM", "e.dicom"):
        assert is_image_file(tmp_path / name)  # by suffix alone (no read)
    for name in ("notes.txt", "labels.csv", "x.npy"):
        (tmp_path / name).write_bytes(b"\0" * 128 + b"DICM")
        assert not is_image_file(tmp_path / name)
    dicom = _save(_dataset(_image()), tmp_path / "tmp.dcm").read_bytes()
    for name in ("IM0001", "1.2.840.113619.2.55.3.604"):  # scanner export / UID file names
        (tmp_path / name).write_bytes(dicom)
        assert is_image_file(tmp_path / name)
    (tmp_path / "README").write_bytes(b"hello " * 40)
    (tmp_path / "DICOMDIR").write_bytes(dicom)  # the media index, not an image
    assert not is_image_file(tmp_path / "README") and not is_image_file(tmp_path / "DICOMDIR")
    assert not is_image_file(tmp_path / "missing") and not is_image_file(tmp_path)
