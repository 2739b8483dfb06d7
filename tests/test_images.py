"""vkd_dist.data.images: modes, bit depths, EXIF, sizing, and bad files as ImageError with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from vkd_dist.data.images import ImageError, load_image, target_size, window_to_uint8


def _gradient(w, h):
    return (np.linspace(0, 255, w)[None, :].repeat(h, 0)).astype(np.uint8)


def test_16bit_png_is_windowed_not_truncated(tmp_path):
    arr = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    out = load_image(tmp_path / "a.png", 32, "keep-aspect")
    assert out.dtype == np.uint8 and out.ndim == 2
    assert out.max() >= 250 and out.min() <= 5  # full range used (naive >> 8 would give max 15)


def test_window_constant_image_is_black():
    assert window_to_uint8(np.full((4, 4), 7, np.uint16)).max() == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "L"])
def test_modes_become_grayscale(tmp_path, mode):
    rgb = np.stack([_gradient(80, 60)] * 3, -1)
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([rgb, np.full((60, 80), 255, np.uint8)]))
    else:
        img = Image.fromarray(rgb).convert(mode)
    img.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png", 40, "crop")
    assert out.shape == (40, 40) and out.dtype == np.uint8
    assert out[:, -1].mean() > out[:, 0].mean() + 100  # the gradient survives


def test_rgba_transparent_composited_on_black(tmp_path):
    arr = np.zeros((50, 50, 4), np.uint8)
    arr[..., :3] = 255  # white but fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png", 32).max() == 0


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((60, 100), np.uint8)
    arr[:, :50] = 255  # left half white, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display -> portrait, white on top
    Image.fromarray(arr).save(tmp_path / "e.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "e.jpg", 60, "keep-aspect")
    assert out.shape[0] > out.shape[1]  # portrait after the EXIF rotation
    assert out[: out.shape[0] // 3].mean() > 200 and out[-out.shape[0] // 3:].mean() < 50


@pytest.mark.parametrize("resize,shape", [("crop", (64, 64)), ("pad", (64, 64)), ("keep-aspect", (64, 128))])
def test_resize_modes(tmp_path, resize, shape):
    Image.fromarray(np.full((200, 400), 200, np.uint8)).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png", 64, resize)
    assert out.shape == shape
    if resize == "pad":
        assert out[0].max() == 0 and out[32].min() > 150  # black bars above/below, image in the middle


def test_large_jpeg_uses_draft_and_matches_size(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1000), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = load_image(tmp_path / "b.jpg", 100, "crop")
    assert out.shape == (100, 100)
    assert target_size(1000, 1200, 100, "crop") == (100, 120)


def test_bad_files_raise_with_kind(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.kind == "missing_image"
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "junk.png")
    assert e.value.kind == "unreadable_image"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "trunc.png")
    assert e.value.kind == "truncated_image"
    Image.fromarray(np.zeros((10, 200), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "thin.png")
    assert e.value.kind == "too_small" and "10" in e.value.reason


@pytest.mark.parametrize("fast", [True, False])
def test_shard_decode_matches_pil_and_rejects_truncated(monkeypatch, fast):
    """The reader's decode_image: TorchCodec for JPEG when installed, else PIL; the same pixels either way."""
    from vkd_dist.data import schema

    if fast and schema._jpeg_decoder() is None:
        pytest.skip("torchcodec (the 'fast' extra) is not installed")
    if not fast:
        monkeypatch.setattr(schema, "_jpeg_decoder", lambda: None)
    gray = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    for mode, fmt in [("L", "JPEG"), ("RGB", "JPEG"), ("L", "PNG")]:
        buf = io.BytesIO()
        Image.fromarray(gray).convert(mode).save(buf, fmt, quality=95)
        out = schema.decode_image(buf.getvalue())
        reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
        assert out.dtype == np.uint8 and out.shape == (40, 56)
        assert np.abs(out.astype(int) - reference).max() <= 1, (mode, fmt)  # RGB->L rounding may differ by 1
    data = schema.encode_image(gray, "jpg")
    with pytest.raises(OSError):  # PIL: "image file is truncated"
        schema.decode_image(data[: len(data) // 2])
