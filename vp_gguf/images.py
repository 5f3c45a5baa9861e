"""Turning user images (paths, bytes, PIL images, arrays) into libmtmd bitmaps.

Formats that llama.cpp's own tools decode (stb_image: PNG, JPEG, BMP, GIF,
TGA, PSD, HDR, PNM) are passed to libmtmd as the file's bytes, so that the
pixels are exactly those llama-mtmd-cli sees. Anything else Pillow can read
(WebP, TIFF, ...) is converted to RGB here. Pillow checks every image first,
so a bad file is a Python error, never a C-side failure.
"""

from __future__ import annotations

import ctypes
import io
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageInput = Union[str, Path, bytes, "Image.Image", np.ndarray]

_STB_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "TGA", "PSD", "PPM"}
# The most pixels (width x height) an image may have, read from its header before it is decoded: a
# small file can declare a huge image (a 420 KB PNG of 12000x12000 cost 1.4 GB and 13 s). The default is
# Pillow's own bound (Image.MAX_IMAGE_PIXELS' default, about 0.25 GB of RGB); load_bitmap's max_pixels
# overrides it per call (the server's per-request limit); None: no bound of ours. Pillow's global is left
# as it is: Pillow still refuses images over twice its own bound while opening them (an ImageError here).
MAX_IMAGE_PIXELS: int | None = 89_478_485


def _rgb_bytes(img: Image.Image) -> tuple[int, int, bytes]:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.width, img.height, img.tobytes()


def describe(src: ImageInput) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return f"<{type(src).__name__}>"


def check_pixels(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse an image over ``max_pixels`` (default: MAX_IMAGE_PIXELS) before its pixels are decoded."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and width * height > limit:
        raise ImageError(
            f"image {name}: {width}x{height} is {width * height} pixels, over the limit of {limit} "
            "pixels per image: use a smaller image"
        )


def _open_checked(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """The image, opened (its header read, nothing decoded yet) and its size checked against the bound."""
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own bound (a warning when the caller's filters turn it into an error): its message
        # names the size and the limit, never the file's bytes
        raise ImageError(f"image {name}: too many pixels to decode ({e})") from None
    try:
        check_pixels(name, im.width, im.height, max_pixels)
    except ImageError:
        im.close()
        raise
    return im


def load_bitmap(mtmd_cpp: Any, mctx: Any, src: ImageInput, max_pixels: int | None = None) -> Any:
    """Return an mtmd_bitmap pointer (caller frees it with mtmd_bitmap_free). An image of more than
    ``max_pixels`` (default: MAX_IMAGE_PIXELS) is refused from its header, before it is decoded."""
    data: bytes | None = None
    rgb: tuple[int, int, bytes] | None = None
    name = describe(src)
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise ImageError(f"image {p}: no such file")
        data = p.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, Image.Image):
        check_pixels(name, src.width, src.height, max_pixels)
        rgb = _rgb_bytes(src)
    elif isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 HxWx3 (or HxWx4 / HxW), got {a.dtype} {a.shape}")
        check_pixels(name, a.shape[1], a.shape[0], max_pixels)
        rgb = (a.shape[1], a.shape[0], np.ascontiguousarray(a[:, :, :3]).tobytes())
    else:
        raise ImageError(
            f"unsupported image type {type(src).__name__}: give a path, bytes, a PIL image or a uint8 array"
        )

    if data is not None:
        try:
            with _open_checked(data, name, max_pixels) as im:
                fmt = im.format
                im.load()  # decodes the whole image: catches truncated files
                # (GIF first: its frame count would read every frame)
                if fmt not in _STB_FORMATS or fmt != "GIF" and getattr(im, "n_frames", 1) > 1:
                    rgb = _rgb_bytes(im)
                w, h = im.size
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            # Pillow's own message is left out: some quote the file's first bytes
            raise ImageError(
                f"image {name}: cannot be read as an image (an unknown format, or a truncated or corrupt file)"
            ) from None
        if w < 1 or h < 1:
            raise ImageError(f"image {name}: empty image")

    if rgb is None:
        assert data is not None
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        res = mtmd_cpp.mtmd_helper_bitmap_init_from_buf_wrapper(
            mctx, buf, len(data), False, mtmd_cpp.mtmd_helper_init_opt_default()
        )
        if res.bitmap and not res.video_ctx:
            return res.bitmap
        if res.video_ctx:  # stb_image refused it and libmtmd tried it as a video: not what we asked for
            mtmd_cpp.mtmd_bitmap_free(res.bitmap)
            mtmd_cpp.mtmd_helper_video_free(res.video_ctx)
        # stb_image refused a file Pillow could read (e.g. a progressive-JPEG variant): decode here.
        with Image.open(io.BytesIO(data)) as im:
            rgb = _rgb_bytes(im)
    nx, ny, pix = rgb
    if nx < 1 or ny < 1:
        raise ImageError(f"image {name}: empty image")
    cbuf = (ctypes.c_uint8 * len(pix)).from_buffer_copy(pix)
    bmp = mtmd_cpp.mtmd_bitmap_init(nx, ny, cbuf)
    if not bmp:
        raise ImageError(f"image {name}: libmtmd could not create a bitmap ({nx}x{ny})")
    return bmp
