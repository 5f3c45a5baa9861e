"""Prompt and media -> libmtmd chunks: the media markers placed, the chat template applied,
images preprocessed, videos read as frames, all tokenized, and what llama.cpp would abort on
refused up front."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from typing_extensions import Self

from . import _log, templates
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import ContextOverflowError, ImageError, InvalidArgumentError, PromptError
from .images import ImageInput, load_bitmap
from .loading import NON_CAUSAL_IMAGE_PROJECTORS, LoadedModel
from .result import ImageSpan
from .video import Video, VideoInput, as_video, read_frames

MediaInput = ImageInput | Video


def media_list(
    images: Sequence[MediaInput] | MediaInput, videos: Sequence[VideoInput] | VideoInput
) -> list[MediaInput]:
    """Images (a Video among them keeps its place), then videos, in the order their markers take
    them; a lone image or video stands for a list of one."""
    from PIL.Image import Image

    lone = (str, Path, bytes, bytearray, Video, Image, np.ndarray)
    imgs = [images] if isinstance(images, lone) else list(images)
    vids = [videos] if isinstance(videos, lone) else list(videos)
    return imgs + [as_video(v) for v in vids]  # type: ignore[arg-type]


def chunk_positions(prep: Prepared):
    """Each chunk of the prompt with the position it starts at."""
    pos = 0
    for i in range(M.mtmd_input_chunks_size(prep.chunks)):
        ch = M.mtmd_input_chunks_get(prep.chunks, i)
        yield ch, pos
        pos += M.mtmd_input_chunk_get_n_pos(ch)


@dataclass
class Prepared:
    """A tokenized prompt (free it with free_prepared, or use it as a context manager)."""

    chunks: int  # mtmd_input_chunks pointer
    n_pos: int
    n_tokens: int
    n_image_tokens: int
    bitmaps: list = field(default_factory=list)
    n_frames: dict[int, int] = field(default_factory=dict)  # frames read, per video (by media index)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        free_prepared(self)


ChatTemplateChoice = bool | str  # False: raw; True: the model's (or ModelParams.chat_template); str: a name or file


def chat_template_of(lm: LoadedModel, spec: str | None = None) -> templates.ChatTemplate:
    """The template ``spec`` names (None: the one the model was loaded with, else its own), chosen
    once per model: a model without one warns once."""
    spec = lm.params.chat_template if spec is None else spec
    cache = lm._chat_templates
    key = spec or ""
    if key not in cache:
        src = L.llama_model_chat_template(lm._model, None)
        cache[key] = templates.choose(lm.model_path.name, src.decode("utf-8", errors="replace") if src else None, spec)
    return cache[key]


def apply_chat_template(lm: LoadedModel, prompt: str | Sequence[dict[str, str]], template: str | None = None) -> str:
    """A prompt as one user turn, or a list of {"role", "content"} messages, in the chat template
    (``template``: a llama.cpp name or a Jinja file; default the model's), ending with the assistant's
    turn to speak."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for m in msgs:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError("each message needs a string 'role' and a string 'content'")
    vocab = lm._vocab
    return templates.render(
        chat_template_of(lm, template),
        msgs,
        bos=_token_text(vocab, L.llama_vocab_bos(vocab)),
        eos=_token_text(vocab, L.llama_vocab_eos(vocab)),
        adds_bos=bool(L.llama_vocab_get_add_bos(vocab)),
    )


def _token_text(vocab, tok: int) -> str:
    if tok < 0:  # LLAMA_TOKEN_NULL: the vocabulary has no such token
        return ""
    return (L.llama_vocab_get_text(vocab, tok) or b"").decode("utf-8", errors="replace")


def place_markers(lm: LoadedModel, prompt: str, n_media: int) -> str:
    """The prompt with one media marker per image or video: as written, or all in front when it has none."""
    n_markers = prompt.count(lm.marker)
    if n_markers == 0 and n_media:
        return lm.marker * n_media + prompt
    if n_markers != n_media:
        raise PromptError(
            f"the prompt has {n_markers} media marker(s) {lm.marker!r} but "
            f"{n_media} image(s) and video(s) were given: use one marker per image or video, "
            "or none to put them all before the prompt"
        )
    return prompt


def prompt_text(lm: LoadedModel, prompt: str, n_media: int, chat_template: ChatTemplateChoice) -> str:
    """The prompt with its media markers, in the chat template if asked (a name or file: that one)."""
    prompt = place_markers(lm, prompt, n_media)
    if chat_template is False or chat_template is None:
        return prompt
    if not isinstance(chat_template, (bool, str)):
        raise InvalidArgumentError(
            f"chat_template must be True, False or a template's name or file, got {type(chat_template).__name__}"
        )
    return apply_chat_template(lm, prompt, chat_template if isinstance(chat_template, str) else None)


def prepare(lm: LoadedModel, prompt: str, media: Sequence[MediaInput], chat_template: ChatTemplateChoice) -> Prepared:
    """Images and videos loaded and the prompt tokenized into chunks, checked against the context.

    Every bitmap is named "<media index>:<sha256>" ("+<frame>" for a video's frames), so that each
    image chunk says which input and frame it is, and a chunk seen before is known by its name."""
    text = prompt_text(lm, prompt, len(media), chat_template)
    prep = Prepared(chunks=M.mtmd_input_chunks_init(), n_pos=0, n_tokens=0, n_image_tokens=0)
    try:
        segments = _media_segments(lm, prep, media)
        raw_parts = _split_at_markers(text, lm.marker, segments)
        keep = []  # the C structs, alive during the call
        ptrs = (ctypes.POINTER(M.mtmd_input_part) * max(1, len(raw_parts)))()
        for j, part in enumerate(raw_parts):
            if isinstance(part, str):
                raw = part.encode("utf-8")
                itext = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
                ip = M.mtmd_input_part(text=ctypes.pointer(itext), bitmap=None)
                keep.append((raw, itext))
            else:
                ip = M.mtmd_input_part(text=None, bitmap=part)
            keep.append(ip)
            ptrs[j] = ctypes.pointer(ip)
        rc = M.mtmd_tokenize_from_parts(lm._mctx, prep.chunks, ptrs, len(raw_parts), True)
        if rc != 0:
            raise ImageError(
                f"libmtmd could not preprocess the prompt's images (code {rc}): "
                f"{_log.last_error() or 'see logs with verbose=True'}"
            )
        _check_prepared(lm, prep)
    except BaseException:
        free_prepared(prep)
        raise
    return prep


def _media_segments(lm: LoadedModel, prep: Prepared, media: Sequence[MediaInput]) -> list[list]:
    """Each image as one bitmap, each video as its parts (text and frames); the bitmaps join prep."""
    segments: list[list] = []
    for k, item in enumerate(media):
        if isinstance(item, Video):
            parts = read_frames(M, lm._mctx, item, k)
            prep.bitmaps += [p[0] for p in parts if not isinstance(p, str)]
            prep.n_frames[k] = sum(not isinstance(p, str) for p in parts)
            segments.append([p if isinstance(p, str) else p[0] for p in parts])
        else:
            bmp = load_bitmap(M, lm._mctx, item)
            prep.bitmaps.append(bmp)
            n = M.mtmd_bitmap_get_n_bytes(bmp)
            digest = hashlib.sha256(ctypes.string_at(M.mtmd_bitmap_get_data(bmp), n)).hexdigest()
            M.mtmd_bitmap_set_id(bmp, f"{k}:{digest}:{M.mtmd_bitmap_get_nx(bmp)}x{M.mtmd_bitmap_get_ny(bmp)}".encode())
            segments.append([bmp])
    return segments


def _split_at_markers(text: str, marker: str, segments: list[list]) -> list:
    """The prompt's text between markers, each marker replaced by its media's parts (empty text
    dropped, as libmtmd's own marker split does)."""
    pieces = text.split(marker)
    assert len(pieces) == len(segments) + 1, "prompt_text placed one marker per media"
    out: list = []
    for j, piece in enumerate(pieces):
        if piece:
            out.append(piece)
        if j < len(segments):
            out += segments[j]
    return out


def chunk_media(chunk) -> tuple[int, int]:
    """(media index, frame) of an image chunk from its bitmap's name; frame -1 for a still image."""
    name = (M.mtmd_input_chunk_get_id(chunk) or b"").decode()
    k, _, rest = name.partition(":")
    frame = rest.rpartition("+")[2] if "+" in rest else "-1"
    return int(k or 0), int(frame)


def image_spans(prep: Prepared) -> list[ImageSpan]:
    """Where each image chunk goes in the sequence, and which input (and frames) it holds."""
    spans: list[ImageSpan] = []
    for ch, pos in chunk_positions(prep):
        if M.mtmd_input_chunk_get_type(ch) != M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            img = M.mtmd_input_chunk_get_tokens_image(ch)
            media, frame = chunk_media(ch)
            spans.append(
                ImageSpan(
                    pos=pos,
                    n_tokens=M.mtmd_input_chunk_get_n_tokens(ch),
                    n_pos=M.mtmd_input_chunk_get_n_pos(ch),
                    nx=M.mtmd_image_tokens_get_nx(img),
                    ny=M.mtmd_image_tokens_get_ny(img),
                    media=media,
                    frame=frame,
                )
            )
    for a, b in zip(spans, spans[1:] + [None]):  # a chunk of merged frames holds frames up to the next
        if a.frame >= 0:
            end = b.frame if b is not None and b.media == a.media else prep.n_frames.get(a.media, a.frame + 1)
            a.n_frames = max(1, end - a.frame)
    return spans


def _check_prepared(lm: LoadedModel, prep: Prepared) -> None:
    """Count the tokens and refuse what llama.cpp would abort on."""
    last_type = None
    for i in range(M.mtmd_input_chunks_size(prep.chunks)):
        ch = M.mtmd_input_chunks_get(prep.chunks, i)
        last_type = M.mtmd_input_chunk_get_type(ch)
        if last_type != M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            nt = M.mtmd_input_chunk_get_n_tokens(ch)
            prep.n_image_tokens += nt
            if lm.projector_type in NON_CAUSAL_IMAGE_PROJECTORS and nt > lm.n_ubatch:
                raise ContextOverflowError(
                    f"an image takes {nt} tokens but n_batch is {lm.n_ubatch}; this model "
                    f"attends to an image as a whole, so raise n_batch to at least {nt}"
                )
    prep.n_tokens = M.mtmd_helper_get_n_tokens(prep.chunks)
    prep.n_pos = M.mtmd_helper_get_n_pos(prep.chunks)
    if last_type is not None and last_type != M.MTMD_INPUT_CHUNK_TYPE_TEXT:
        raise PromptError("the prompt ends with an image: put the question (some text) after the last image marker")
    if prep.n_tokens == 0:
        raise PromptError("the prompt is empty")
    if prep.n_pos + 1 > lm.n_ctx or prep.n_tokens + 1 > lm.n_ctx:
        raise ContextOverflowError(
            f"the prompt needs {prep.n_tokens} tokens ({prep.n_image_tokens} for images) but the "
            f"context holds {lm.n_ctx}: raise n_ctx (-c) or use fewer/smaller images"
        )


def free_prepared(prep: Prepared) -> None:
    for b in prep.bitmaps:
        M.mtmd_bitmap_free(b)
    prep.bitmaps.clear()
    if prep.chunks:
        M.mtmd_input_chunks_free(prep.chunks)
        prep.chunks = 0
