"""Open, validate and decode image files; read their metadata; fit them to a model."""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import files

# Names a directory scan picks up. A file named explicitly is always tried.
EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp"}

ImageFile.LOAD_TRUNCATED_IMAGES = False

# The most bytes Pillow passes its decoder in one call (its default is 64 kB): a whole
# camera JPEG or PNG, or a 2000x2000 WebP's decoded frame, in one. A call costs a copy
# of what it passes, so this bounds the extra memory per decoding thread. With another
# thread busy in Python (bench/gil.py), a JPEG decodes 1.6-1.8 times and a WebP 6.5
# times faster than in 64 kB pieces.
DECODE_BLOCK = 16 * 2**20

_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_DATETIME_ORIGINAL = 36867
_DATETIME_DIGITIZED = 36868
_DATETIME = 306
_MAKE = 271
_MODEL = 272


class ImageError(Exception):
    """A file that cannot be ingested; the message says why, for a person."""


class NotAnImage(ImageError):
    """Bytes in no format Pillow reads (as against an image that is broken or too big)."""


@dataclass
class Decoded:
    """One image file, opened, checked and turned into RGB."""

    path: str
    sha256: str
    size: int
    width: int
    height: int
    format: str
    image: Image.Image  # RGB, orientation applied, possibly reduced by JPEG draft
    taken_at: str | None = None
    camera: str | None = None
    latitude: float | None = None
    longitude: float | None = None

    def metadata(self) -> dict:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "taken_at": self.taken_at,
            "camera": self.camera,
            "latitude": self.latitude,
            "longitude": self.longitude,
        }


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(
    path: str | Path,
    data: bytes | None = None,
    min_side: int | None = None,
    sha256: str | None = None,
    max_pixels: int = files.MAX_PIXELS,
) -> Decoded:
    """Open ``path`` (or its already-read ``data``) and return it as RGB with metadata.

    ``min_side``: the smallest short side the caller needs. A JPEG much larger
    than that is decoded at a reduced scale (DCT scaling), several times faster
    than a full decode; any other image at least twice that size is box-reduced
    by a whole factor right after decoding, so that fitting it to the model and
    making its thumbnail work on a small image.
    ``sha256``: the hash of ``data`` when the caller has it already.
    ``max_pixels``: refused when the header claims more, before anything is decoded.
    Raises ImageError with a reason a person can act on.
    """
    path = str(path)
    if data is None:
        try:
            data, _ = files.read(path, None)
        except files.Unreadable as e:
            raise ImageError(str(e)) from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused as a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise NotAnImage("not an image Pillow can read (unknown or corrupt format)") from None
    except OSError as e:
        raise ImageError(f"truncated or corrupt image header: {e}") from None
    except Exception as e:  # Pillow raises many kinds on hostile headers
        raise ImageError(f"cannot open image: {e}") from None

    # The data is in memory: hand the decoder all of it at once, not in Pillow's
    # 64 kB pieces. Each piece gives up the GIL and has to win it back, which takes up
    # to the switch interval (5 ms) while another thread runs Python: bench/ingest.py's
    # JPEGs came in 8 pieces on average, its WebPs' decoded frames in 89. See DECODE_BLOCK.
    img.decodermaxblock = DECODE_BLOCK
    width, height = img.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise ImageError(
            f"refused: {width}x{height} is {width * height:,} pixels, over the "
            f"limit of {max_pixels:,} (--max-pixels; decompression bomb guard)"
        )
    fmt = img.format or "UNKNOWN"
    exif = _read_exif(img)
    orientation = exif.pop("orientation", 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width

    if min_side and fmt == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        # draft() keeps both sides >= the requested size
        img.draft(img.mode, (min_side, min_side))
    try:
        img.load()
    except OSError as e:
        raise ImageError(f"truncated or corrupt image data: {e}") from None
    except Exception as e:
        raise ImageError(f"cannot decode image: {e}") from None

    try:
        if min_side:
            img = reduce(img, min_side)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except Exception as e:
        raise ImageError(f"cannot convert image to RGB: {e}") from None
    return Decoded(
        path=path,
        sha256=sha256 or sha256_bytes(data),
        size=len(data),
        width=width,
        height=height,
        format=fmt,
        image=rgb,
        **exif,
    )


def reduce(img: Image.Image, min_side: int) -> Image.Image:
    """Shrink by the largest whole factor that keeps the short side >= ``min_side``
    (a box filter: each output pixel is the mean of a factor x factor block)."""
    factor = min(img.size) // min_side
    if factor < 2 or img.mode not in ("RGB", "RGBA", "L", "LA", "CMYK", "YCbCr", "I", "F", "P"):
        return img
    if img.mode == "P":  # box means of palette indices are meaningless
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.reduce(factor)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0
        # 16-bit data spans 0..65535; 32-bit int or float data is scaled by its own range
        scale = 257.0 if img.mode.startswith("I;16") or top > 255 else 1.0
        if img.mode in ("I", "F") and top > 65535:
            scale = top / 255.0
        arr = np.clip(arr / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def fit(image: Image.Image, size: int, crop: float = 1.0) -> np.ndarray:
    """Centre-crop ``crop`` of the short side, resize to size x size; uint8 HxWx3."""
    w, h = image.size
    side = min(w, h) * crop
    left = (w - side) / 2
    top = (h - side) / 2
    box = (left, top, left + side, top + side)
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def min_side_for(size: int, crop: float) -> int:
    """The short side a decode needs so that ``fit`` never upsamples."""
    return math.ceil(size / crop)


THUMBNAIL_SIDE = 256  # the longest side of the thumbnails stored for the browser


def thumbnail(image: Image.Image, max_side: int = THUMBNAIL_SIDE, quality: int = 80) -> bytes:
    """A small JPEG of an RGB image, for the browser."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap=1: a fast integer box reduction first, then Lanczos for the last step;
    # half the time of the default at no visible cost at this size.
    thumb = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=1.0)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _read_exif(img: Image.Image) -> dict:
    """EXIF date taken, camera, GPS and orientation; missing or broken tags are None."""
    result: dict = {"taken_at": None, "camera": None, "latitude": None, "longitude": None}
    try:
        exif = img.getexif()
    except Exception:
        return result
    if not exif:
        return result
    result["orientation"] = _int_or(exif.get(0x0112), 1)
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:
        sub = {}
    for tag, source in ((_DATETIME_ORIGINAL, sub), (_DATETIME_DIGITIZED, sub), (_DATETIME, exif)):
        taken = _parse_exif_date(source.get(tag))
        if taken:
            result["taken_at"] = taken
            break
    make = _clean(exif.get(_MAKE))
    model = _clean(exif.get(_MODEL))
    if make and model and model.lower().startswith(make.lower().split()[0]):
        make = None  # "Canon" + "Canon EOS 5D" reads better as the model alone
    result["camera"] = " ".join(x for x in (make, model) if x) or None
    try:
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:
        gps = {}
    lat = _gps_degrees(gps.get(2), gps.get(1))
    lon = _gps_degrees(gps.get(4), gps.get(3))
    if lat is not None and lon is not None and abs(lat) <= 90 and abs(lon) <= 180:
        result["latitude"], result["longitude"] = lat, lon
    return result


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _clean(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value).replace("\x00", "").strip()
    return value or None


def _parse_exif_date(value) -> str | None:
    value = _clean(value)
    if not value:
        return None
    for pattern in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y:%m:%d"):
        try:
            return datetime.strptime(value[:19], pattern).isoformat()
        except ValueError:
            continue
    return None


def _gps_degrees(dms, ref) -> float | None:
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if any(math.isnan(x) for x in (d, m, s)):
        return None
    value = d + m / 60 + s / 3600
    ref = _clean(ref)
    if ref in ("S", "W"):
        value = -value
    return round(value, 7)
