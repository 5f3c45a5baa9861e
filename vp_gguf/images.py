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


def _rgb_bytes(img: Image.Image) -> tuple[int, int, bytes]:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.width, img.height, img.tobytes()


def describe(src: ImageInput) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return f"<{type(src).__name__}>"


def load_bitmap(mtmd_cpp: Any, mctx: Any, src: ImageInput) -> Any:
    """Return an mtmd_bitmap pointer (caller frees it with mtmd_bitmap_free)."""
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
        rgb = _rgb_bytes(src)
    elif isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 HxWx3 (or HxWx4 / HxW), got {a.dtype} {a.shape}")
        rgb = (a.shape[1], a.shape[0], np.ascontiguousarray(a[:, :, :3]).tobytes())
    else:
        raise ImageError(
            f"unsupported image type {type(src).__name__}: give a path, bytes, a PIL image or a uint8 array"
        )

    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()  # decodes the whole image: catches truncated files
                if fmt not in _STB_FORMATS or getattr(im, "n_frames", 1) > 1 and fmt != "GIF":
                    rgb = _rgb_bytes(im)
                w, h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {name}: cannot be read as an image ({e})") from None
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
