"""What a server request may ask and read: the limits (`serve`'s flags read their defaults here, so
this module loads no native library), and the media: data: URLs decoded, file:// URLs read only
from the operator's --media-path.

Every check happens before a byte reaches a decoder, and no error text says more than the request
already knew: a path outside the media folder gets the same answer whether or not it exists, and
a decoder's own message (which can quote a file's first bytes) is never passed on.
"""

from __future__ import annotations

import base64
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote


class RequestError(ValueError):
    """A bad request (HTTP 400, or ``status``) with a message that says what to fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaAccess:
    """Where file:// URLs may read (None: nowhere, llama-server's default) and how much."""

    root: Path | None = None
    max_image_bytes: int = 20 << 20
    max_video_bytes: int = 200 << 20

    def limit(self, kind: str) -> int:
        return self.max_video_bytes if kind == "video" else self.max_image_bytes


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask; each is a 400 (or 413) naming the limit, checked before any work."""

    max_body_mb: float = 64.0  # the request body (a base64 image is 4/3 of its file)
    max_messages: int = 512
    max_media: int = 16  # images and videos in one request
    max_image_pixels: int = 40_000_000  # one image, from its header (a 12000x12000 PNG can be 420 KB)
    max_pixels: int = 160_000_000  # a request's images and video frames together (64 frames of 1080p fit)
    max_image_mb: float = 20.0
    max_video_mb: float = 200.0  # file:// videos (a data: video is bounded by the body)

    def check(self) -> None:
        for k, v in vars(self).items():
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{k.replace('_', '-')} must be a positive number, got {v}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    def media_access(self, root) -> MediaAccess:
        return MediaAccess(root, int(self.max_image_mb * (1 << 20)), int(self.max_video_mb * (1 << 20)))


def media_root(path: str | os.PathLike) -> Path:
    """--media-path, resolved once (symlinks included) so that containment is a prefix test."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--media-path {path}: not a directory")
    return root


def media_bytes(url: object, kind: str, access: MediaAccess) -> bytes:
    """The bytes a data: or file:// URL names; anything else is refused (nothing remote is fetched)."""
    if not isinstance(url, str):
        raise RequestError(f"{kind}_url.url must be a string")
    limit = access.limit(kind)
    if url.startswith("data:"):
        return _data_url(url, kind, limit)
    if url.startswith("file://"):
        return _local_file(url, kind, access.root, limit)
    raise RequestError(f"{kind} URLs must be data: (base64) or file:// URLs; this server fetches nothing remote")


def _data_url(url: str, kind: str, limit: int) -> bytes:
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise RequestError(f"data: {kind} URLs must be base64")
    if len(data) > limit * 4 // 3 + 4:
        raise RequestError(f"{kind} larger than the server's limit of {limit >> 20} MB", 413)
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise RequestError(f"data: {kind} URL is not valid base64") from None


def _local_path(url: str, root: Path) -> Path:
    """file://name (llama-server's form: relative to the media folder) or file:///abs/name, confined
    to the folder after every symlink and '..' is resolved."""
    rest = url[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    rest = unquote(rest.partition("?")[0].partition("#")[0])
    if "\x00" in rest or not rest.strip("/"):
        raise RequestError("file:// URL: not a file path")
    path = Path(rest) if rest.startswith("/") else root / rest
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise RequestError("file:// URL: outside the server's --media-path", 403)
    return real


def _local_file(url: str, kind: str, root: Path | None, limit: int) -> bytes:
    if root is None:
        raise RequestError("file:// URLs are refused: the server was started without --media-path", 403)
    path = _local_path(url, root)
    shown = path.relative_to(root)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path is the file
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RequestError(f"{kind} {shown}: no such file in the media folder") from None
    except OSError:
        raise RequestError(f"{kind} {shown}: cannot be opened") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RequestError(f"{kind} {shown}: not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as f:
        if st.st_size > limit:
            raise RequestError(f"{kind} {shown} larger than the server's limit of {limit >> 20} MB", 413)
        try:
            data = f.read(limit + 1)
        except OSError:
            raise RequestError(f"{kind} {shown}: cannot be read") from None
    if data is None or len(data) > limit:
        raise RequestError(f"{kind} {shown}: cannot be read whole within {limit >> 20} MB", 413)
    return data


def image_pixels(data: bytes, index: int, max_pixels: int) -> int:
    """The pixel count from the image's header (nothing decoded); the decoder's own message, which can
    quote the file's first bytes, is never passed on."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise RequestError(f"image {index}: more pixels than the server's limit of {max_pixels:,}") from None
    except Exception:  # noqa: BLE001 - Pillow raises many kinds; all mean "not an image we can read"
        raise RequestError(f"image {index}: not a readable image (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    if w < 1 or h < 1:
        raise RequestError(f"image {index}: empty image")
    return w * h
