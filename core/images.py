"""The image limits every component applies, and the checks that dataset and benchmark loaders run on
each image before it becomes a `Prompt` (the encoder, `core.vl.prepare_image`, refuses the same): the
field's type (`image_entry`), the path's folder (`inside_folder`), the file (`read_image_file`), the
bytes (`checked_image`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from core.records import BadField, describe_type

MAX_IMAGE_PIXELS = 64_000_000
"""Encoded images whose header claims more pixels than this are refused before decoding (decompression bombs)."""
MAX_ASPECT_RATIO = 200
"""The Qwen2.5-VL image processor refuses images more elongated than this."""


class BadImage(BadField):
    """An image no component could use: `reason` names the kind (wrong_type, missing_image,
    image_outside_dataset, unreadable_image, undecodable_image, huge_image, elongated_image)."""


def image_entry(value: Any, name: str) -> bytes | str | None:
    """What one image field holds: encoded bytes, a path, or None when it is empty. An HF Image dict
    `{bytes, path}` gives its bytes, else its path. Any other type (text where bytes belong, a number,
    a nested list) raises BadImage (`wrong_type`) for that row alone."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise BadImage("wrong_type", f"{name}.bytes is {describe_type(data)}, not image bytes",
                           "store the encoded image (PNG/JPEG bytes) there, or a file path under 'path' "
                           "(JSON cannot hold bytes: save the image as a file)")
        if data:
            return bytes(data)
        value, name = value.get("path"), f"{name}.path"
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if isinstance(value, str):
        return value if value.strip() else None
    raise BadImage("wrong_type", f"{name} is {describe_type(value)}, not image bytes or a path",
                   "give the image as encoded bytes, a path, or an HF Image {bytes, path}")


def inside_folder(path: Path, folder: Path) -> Path:
    """`path` with symlinks and `..` resolved, if it lies inside `folder` (resolved too); a path that
    escapes it (`../../etc/passwd`, an absolute path elsewhere, a symlink pointing out) raises BadImage."""
    try:
        real, root = Path(path).resolve(), Path(folder).resolve()
    except ValueError as e:  # an embedded NUL byte
        raise BadImage("missing_image", f"image path {str(path)!r} is not a path ({e})", "fix the image path") from None
    if not real.is_relative_to(root):
        raise BadImage("image_outside_dataset", f"image path {str(path)!r} resolves to {real}, outside the "
                       f"dataset folder {root}", "keep the images inside the dataset's folder (copy them in)")
    return real


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file; an OS error (permission denied, an I/O error) raises BadImage naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadImage("unreadable_image", f"image file {path} cannot be read ({e.strerror or e})",
                       "check the file and its permissions") from None


def checked_image(data: bytes) -> bytes:
    """PNG or JPEG bytes, checked (size before decoding, then a full decode); other formats are
    re-encoded as PNG. Raises BadImage. Shared by the training loaders and the benchmark loaders."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(img.width, img.height)
            img.load()
            if img.format in ("PNG", "JPEG"):
                return data
            out = io.BytesIO()
            img.save(out, format="PNG")
            return out.getvalue()
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadImage("undecodable_image", f"image does not decode ({type(e).__name__}: {e})", "replace the image") from None


def _check_size(width: int, height: int) -> None:
    """Refuse, before decoding, what `core.vl.prepare_image` would refuse (the same limits)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage("huge_image", f"image is {width}x{height}, over {MAX_IMAGE_PIXELS:,} pixels",
                       "downscale it in the dataset")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise BadImage("elongated_image", f"image is {width}x{height}, more elongated than {MAX_ASPECT_RATIO}:1",
                       "crop or pad it in the dataset")
