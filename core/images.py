"""The image limits every component applies, and the check that dataset and benchmark loaders run on
each image before it becomes a `Prompt` (the encoder, `core.vl.prepare_image`, refuses the same)."""

from __future__ import annotations

import io

MAX_IMAGE_PIXELS = 64_000_000
"""Encoded images whose header claims more pixels than this are refused before decoding (decompression bombs)."""
MAX_ASPECT_RATIO = 200
"""The Qwen2.5-VL image processor refuses images more elongated than this."""


class BadImage(ValueError):
    """An image no component could use: `reason` names the kind (undecodable, huge, elongated)."""

    def __init__(self, reason: str, detail: str, fix: str) -> None:
        super().__init__(f"{detail}; {fix}")
        self.reason, self.detail, self.fix = reason, detail, fix


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
