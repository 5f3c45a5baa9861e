"""A multi-turn conversation about images (what `vp-gguf chat` runs).

Each turn renders the whole history through the model's chat template, images
and videos in the turns they were attached to, and generates the reply. The KV
cache keeps the conversation so far (cache_prompt), so an image is encoded and
prefilled once per conversation: a turn prefills only its own message. VisionPulse,
if given, selects at every step of every reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, cast

from .errors import ImageError, VideoError
from .model import VisionModel
from .prompt import MediaInput
from .result import GenerationResult
from .sampling import SamplingParams
from .video import VideoInput, as_video, ffmpeg_folder
from .visionpulse import VisionPulse


class _ImagePart:
    """A content part: the next image or video of the request goes here."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = _ImagePart()


def render_messages(model: VisionModel, messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages -> the prompt, in the model's chat template, ending with the assistant's turn.

    A message's content is a string or a list of parts: text, or IMAGE where an image or a video
    goes (the model's media marker; the media are given to generate() in the same order). The one
    renderer of the server and of ``vp-gguf chat``."""
    out = []
    for m in messages:
        c = m["content"]
        text = c if isinstance(c, str) else "".join(model.marker if isinstance(p, _ImagePart) else p for p in c)
        out.append({"role": m["role"], "content": text})
    return model.apply_chat_template(out)


class Chat:
    def __init__(
        self,
        model: VisionModel,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        visionpulse: VisionPulse | int | str | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
    ) -> None:
        self.model, self.system, self.sampling = model, system, sampling
        self.visionpulse, self.max_tokens, self.stop = visionpulse, max_tokens, list(stop)
        self.last_result: GenerationResult | None = None
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[MediaInput] = []  # every image and video of the conversation, in order
        self.pending: list[MediaInput] = []  # attached to the next user message

    def attach(self, path: str | Path) -> None:
        """Attach an image to the next message (checked now, so a typo is caught before the turn)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ImageError(f"image {p}: no such file")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:  # reads the header: Pillow refuses a decompression bomb here
                im.verify()
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {p}: too many pixels to decode ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"image {p}: cannot be read as an image ({e})") from None
        self.pending.append(p)

    def attach_video(self, video: VideoInput) -> None:
        """Attach a video to the next message (the file and ffmpeg are checked now)."""
        v = as_video(video)
        if isinstance(v.source, (str, Path)) and not Path(v.source).expanduser().is_file():
            raise VideoError(f"video {v.source}: no such file")
        ffmpeg_folder(v.ffmpeg_dir)
        self.pending.append(v)

    def say(self, text: str) -> Generator[str, None, None]:
        """Stream the reply to ``text``; the turn joins the history when the reply ends.

        A reply stopped early (the caller closes this generator: Ctrl-C in ``vp-gguf chat``) joins
        with what it said so far, as llama-mtmd-cli keeps it: that is the text the user saw and may
        refer to, and the KV cache already holds its tokens, so the next turn reuses them. A turn that
        fails (a media file that does not decode, a full context) leaves the history as it was and
        drops the media attached to it, so that the next turn does not fail the same way."""
        user = {"role": "user", "content": [IMAGE] * len(self.pending) + [text]}
        images = self.images + self.pending
        reply: list[str] = []
        try:
            prompt = render_messages(self.model, self.messages + [user])
            stream = self.model.stream(
                prompt,
                images=images,
                max_tokens=self.max_tokens,
                sampling=self.sampling,
                chat_template=False,
                visionpulse=self.visionpulse,
                cache_prompt=True,
                stop=self.stop,
            )
            # closed on every way out, at once rather than whenever it is collected: the model is free
            # for the next turn, and its record of the KV cache ends at the last token it decoded
            with contextlib.closing(cast(Generator[str, None, None], stream)):
                for piece in stream:
                    reply.append(piece)
                    yield piece
        except GeneratorExit:
            self._record(user, images, "".join(reply), None)
            raise
        except Exception:
            self.pending = []
            raise
        self._record(user, images, "".join(reply), self.model.last_result)

    def _record(
        self, user: dict[str, Any], images: list[MediaInput], reply: str, result: GenerationResult | None
    ) -> None:
        """The turn joins the history; a stopped reply has no result (no counts, no VisionPulse report)."""
        self.last_result = result
        self.messages += [user, {"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
