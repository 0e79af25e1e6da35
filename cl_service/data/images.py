"""Image bytes: validation on the way in, decoding on the way out."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

#: Formats stored as they are; anything else PIL can read is re-encoded to PNG.
KEPT_FORMATS = {"PNG", "JPEG"}


class BadImage(ValueError):
    """Image bytes that are empty, truncated, or not an image."""


def validate_image(data: bytes) -> bytes:
    """Return storable bytes for ``data`` (PNG/JPEG kept as is, other formats re-encoded to PNG).

    Raises :class:`BadImage` when the bytes do not decode completely.
    """
    if not data:
        raise BadImage("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # verify() misses truncated pixel data; a full decode does not
            if fmt in KEPT_FORMATS:
                return data
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - decoders of corrupt files raise many kinds (EOFError, struct.error, ...)
        raise BadImage(f"not a decodable image ({type(e).__name__}: {str(e)[:200]})") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode stored bytes to an RGB PIL image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a decodable image ({type(e).__name__}: {e})") from None


def image_format(data: bytes) -> str:
    """File extension for stored bytes: ``png`` or ``jpg``."""
    return "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
