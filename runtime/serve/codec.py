"""Images in and out of JSON: base64 PNG (or JPEG/WebP in) to PIL, bounded; PIL to base64 PNG with its infotext."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, PngImagePlugin

PARAMETERS_CHUNK = "diffusion-engine"  # our parameters as JSON, beside A1111's "parameters" text


def decode_image(data: object, field: str, max_pixels: int, max_bytes: int) -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) as a loaded PIL image; ValueError names
    the field. Never a path or a URL to fetch: only the bytes given. Pillow's decompression-bomb guard is
    on, below our own pixel limit (`max_pixels`: what the engine could use, with room for a resize)."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"{field} must be a base64-encoded image, got {type(data).__name__}")
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise ValueError(f"{field}: a data URL must be data:image/...;base64,<data>")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise ValueError(f"{field} is larger than the {max_bytes // (1 << 20)} MiB this server takes per image")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64 (a file path or URL is not accepted: send the image's bytes)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise ValueError(f"{field} is {image.width}x{image.height}: more than the {max_pixels} pixels this "
                                 "server takes per image")
            image.load()
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError) as exc:
        raise ValueError(f"{field} cannot be read as an image ({exc})") from None
    return image


def png_bytes(image: Image.Image, infotext: str | None = None, parameters_json: str | None = None) -> bytes:
    """The image as PNG with A1111's `parameters` text and our JSON chunk where given."""
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    if parameters_json is not None:
        info.add_text(PARAMETERS_CHUNK, parameters_json)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
