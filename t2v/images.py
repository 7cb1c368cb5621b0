"""Images a user gives (a video's first frame): read safely, checked against the video they start.

Every check raises an InputError naming the field and its limit, before any pixel is decoded where it can: the
byte size first, then the format and the pixel count from the header (a decompression bomb is a small file
whose header promises a huge image), then the aspect against the requested video's.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_BYTES = 20 * 2**20
MAX_PIXELS = 4096 * 4096
ASPECT_TOLERANCE = 0.02  # relative: resizing within it distorts a circle by at most 2%


def read_image(data: bytes, field: str = "image") -> Image.Image:
    """Image bytes (PNG, JPEG or WebP) -> an RGB image."""
    if len(data) > MAX_BYTES:
        raise InputError(field, f"{len(data)} bytes", f"at most {MAX_BYTES} bytes")
    too_many = f"at most {MAX_PIXELS} pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:  # opening reads the header only
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise InputError(field, "not an image t2v reads", ", ".join(FORMATS)) from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # PIL's own, far higher limit
            raise InputError(field, "the header promises a decompression bomb", too_many) from None
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputError(field, f"{width}x{height} is {width * height} pixels", too_many)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise InputError(field, f"the image does not decode ({type(e).__name__})",
                             ", ".join(FORMATS)) from None
    return image.convert("RGB")


def check_aspect(size: tuple[int, int], width: int, height: int, field: str = "image") -> None:
    """An image of (w, h) pixels may start a width x height video if their aspects agree within the tolerance
    (it is then resized; a crop is the user's choice, not t2v's)."""
    w, h = size
    if w < 1 or h < 1:
        raise InputError(field, f"{w}x{h} pixels", "a non-empty image")
    aspect, wanted = w / h, width / height
    if abs(aspect - wanted) / wanted > ASPECT_TOLERANCE:
        raise InputError(field, f"{w}x{h} has aspect {aspect:.3f}; the video is {width}x{height} ({wanted:.3f})",
                         f"an image of the video's aspect within {ASPECT_TOLERANCE:.0%} (crop it first)")


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, an [H, W, 3] array or a [3, H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.size
    shape = tuple(image.shape)
    return (shape[1], shape[0]) if isinstance(image, np.ndarray) else (shape[-1], shape[-2])


def to_pixels(image: Image.Image, height: int, width: int):
    """An RGB image -> the [1, 3, height, width] tensor in [-1, 1] a VAE encodes, resized as diffusers' video
    pipelines resize their image inputs."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor().preprocess(image, height=height, width=width)
