from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from collection import images
from conftest import make_image


def _exif_jpeg(path, orientation=1, size=(60, 40)):
    """A JPEG whose left half is red and right half blue, with EXIF date, camera and GPS."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    arr[:, size[0] // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[271] = "Canon"
    exif[272] = "Canon EOS 5D"
    exif.get_ifd(0x8769)[36867] = "2019:07:14 10:20:30"
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (TiffImagePlugin.IFDRational(41), TiffImagePlugin.IFDRational(18), TiffImagePlugin.IFDRational(36))
    gps[3] = "W"
    gps[4] = (TiffImagePlugin.IFDRational(72), TiffImagePlugin.IFDRational(55), TiffImagePlugin.IFDRational(Fraction(12, 10)))
    Image.fromarray(arr).save(path, "JPEG", exif=exif, quality=95)
    return path


def test_reads_metadata_and_hash(tmp_path):
    path = _exif_jpeg(tmp_path / "photo.jpg")
    decoded = images.decode(path)
    assert (decoded.width, decoded.height, decoded.format) == (60, 40, "JPEG")
    assert decoded.taken_at == "2019-07-14T10:20:30"
    assert decoded.camera == "Canon EOS 5D"
    assert decoded.latitude == pytest.approx(41.31)
    assert decoded.longitude == pytest.approx(-(72 + 55 / 60 + 1.2 / 3600))
    assert decoded.sha256 == images.sha256_bytes(path.read_bytes())
    assert decoded.size == path.stat().st_size


def test_exif_orientation_is_applied(tmp_path):
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to display.
    decoded = images.decode(_exif_jpeg(tmp_path / "rotated.jpg", orientation=6))
    assert (decoded.width, decoded.height) == (40, 60)
    arr = np.asarray(decoded.image)
    assert arr.shape == (60, 40, 3)
    top, bottom = arr[5, 20], arr[-5, 20]
    assert top[0] > 200 and top[2] < 60  # red (was left) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_common_formats(tmp_path, fmt, ext):
    path = make_image(tmp_path / f"x.{ext}", fmt=fmt)
    decoded = images.decode(path)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (64, 48)


def test_png_with_alpha_is_composited_on_white(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, 5:, 3] = 255  # right half opaque red, left half fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(images.decode(tmp_path / "a.png").image)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 9]) == (255, 0, 0)


def test_16_bit_png_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(images.decode(tmp_path / "deep.png").image)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb[8, 0, 0] < 156  # mid-grey stays mid-grey, not clipped to white


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rgb = np.asarray(images.decode(tmp_path / "cmyk.jpg").image)
    assert rgb.shape == (20, 20, 3)
    r, g, b = rgb[10, 10]
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in (1, 2, 3)]
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12)
    for frame in frames:
        frame.putpalette(palette)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    decoded = images.decode(tmp_path / "anim.gif")
    assert decoded.format == "GIF"
    assert tuple(np.asarray(decoded.image)[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"hello, I am text pretending to be a JPEG\n" * 10, "not an image"),
    ],
)
def test_non_images_are_refused(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(images.ImageError, match=reason):
        images.decode(path)


def test_truncated_jpeg_is_refused(tmp_path):
    path = make_image(tmp_path / "whole.jpg", size=(400, 300), quality=90)
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match="truncated"):
        images.decode(tmp_path / "cut.jpg")


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_the_decoder_gets_a_file_in_one_call(tmp_path, ext, monkeypatch):
    """Each call into Pillow's decoder gives up the GIL and must win it back (up to
    5 ms while another thread runs Python): a file held in memory goes in one call,
    not in 64 kB pieces (a WebP's decoded frame is read back as raw pieces too)."""
    path = tmp_path / f"noisy.{ext}"
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    assert path.stat().st_size > 3 * 65536  # several of Pillow's default pieces
    calls = []
    getdecoder = Image._getdecoder

    class Counted:
        def __init__(self, decoder):
            self.decoder = decoder

        def __getattr__(self, name):
            return getattr(self.decoder, name)

        def decode(self, data):
            calls.append(len(data))
            return self.decoder.decode(data)

    monkeypatch.setattr(Image, "_getdecoder", lambda *args: Counted(getdecoder(*args)))
    decoded = images.decode(path)
    assert decoded.image.size == (800, 600)
    assert len(calls) == 1


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: the classic decompression bomb."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(50_000, 50_000))
    assert path.stat().st_size < 200
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode(path)


def test_draft_decoding_keeps_enough_pixels(tmp_path):
    path = make_image(tmp_path / "big.jpg", size=(2000, 1500), quality=90)
    decoded = images.decode(path, min_side=342)
    assert (decoded.width, decoded.height) == (2000, 1500)  # metadata is the original size
    assert min(decoded.image.size) >= 342
    assert decoded.image.size[0] < 2000  # but it decoded at a reduced scale


@pytest.mark.parametrize("fmt", ["png", "webp", "tiff"])
def test_large_non_jpeg_images_are_reduced_after_decoding(tmp_path, fmt):
    path = make_image(tmp_path / f"big.{fmt}", size=(1200, 900))
    decoded = images.decode(path, min_side=256)
    assert (decoded.width, decoded.height) == (1200, 900)  # metadata is the original size
    assert decoded.image.size == (400, 300)  # the largest whole factor (3) keeping 300 >= 256
    full = images.decode(path).image
    assert full.size == (1200, 900)  # no min_side: nothing reduced
    # what the model sees barely changes: box reduction, then the same bicubic fit
    difference = np.abs(images.fit(decoded.image, 224, 0.875).astype(int) - images.fit(full, 224, 0.875))
    assert difference.mean() < 2.0


def test_reduce_averages_blocks_and_leaves_small_images_alone():
    arr = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    reduced = np.asarray(images.reduce(Image.fromarray(arr, "L"), 10))
    assert reduced.shape == (10, 15)  # factor 4: 10 >= 10, factor 5 would give 8
    blocks = arr.reshape(10, 4, 15, 4).mean(axis=(1, 3))
    assert np.abs(reduced - blocks).max() <= 1  # rounding
    small = Image.fromarray(arr, "L")
    assert images.reduce(small, 21) is small  # under twice min_side: untouched


def test_reduce_turns_palette_images_into_colour_first():
    arr = np.zeros((200, 200), np.uint8)
    arr[:, 100:] = 1  # palette index 1 on the right half
    image = Image.fromarray(arr, "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 red, 1 blue
    reduced = images.reduce(image, 50)
    assert reduced.mode == "RGB" and reduced.size == (50, 50)
    assert reduced.getpixel((10, 25)) == (255, 0, 0)
    assert reduced.getpixel((40, 25)) == (0, 0, 255)


def test_sixteen_bit_images_decode_at_full_scale_with_min_side(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 600, dtype=np.uint16), (600, 1))  # black to white
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    decoded = images.decode(path, min_side=256)  # box-reduced if Pillow can, else kept whole
    assert min(decoded.image.size) >= 256
    rgb = np.asarray(decoded.image)
    assert rgb[:, 0].max() <= 2 and rgb[:, -1].min() >= 253  # the full range survives
    assert 100 < rgb[0, rgb.shape[1] // 2, 0] < 156


def test_fit_crops_the_centre_and_resizes():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 50:150] = 255  # the centre square is white, the sides black
    out = images.fit(Image.fromarray(arr), 32, crop=1.0)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[1:-1, 1:-1].min() == 255
    assert out.min() > 200  # bicubic edges blend a little with the cropped-off neighbours


def test_thumbnail_is_a_small_jpeg(tmp_path):
    image = Image.open(make_image(tmp_path / "t.png", size=(800, 600))).convert("RGB")
    thumb = Image.open(io.BytesIO(images.thumbnail(image)))
    assert thumb.format == "JPEG"
    assert max(thumb.size) == 256
