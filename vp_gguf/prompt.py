"""Prompt and media -> libmtmd chunks: the image markers placed, the chat template applied,
images preprocessed and tokenized, and what llama.cpp would abort on refused up front."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

from typing_extensions import Self

from . import _log
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import ContextOverflowError, ImageError, PromptError
from .images import load_bitmap
from .loading import NON_CAUSAL_IMAGE_PROJECTORS, LoadedModel


@dataclass
class Prepared:
    """A tokenized prompt (free it with free_prepared, or use it as a context manager)."""

    chunks: int  # mtmd_input_chunks pointer
    n_pos: int
    n_tokens: int
    n_image_tokens: int
    bitmaps: list = field(default_factory=list)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        free_prepared(self)


def apply_chat_template(lm: LoadedModel, prompt: str | Sequence[dict[str, str]]) -> str:
    """A prompt as one user turn, or a list of {"role", "content"} messages, in the model's own
    chat template, ending with the assistant's turn to speak."""
    tmpl = L.llama_model_chat_template(lm._model, None)
    if not tmpl:
        raise PromptError(
            f"{lm.model_path.name} has no chat template; pass the prompt raw "
            "(chat_template=False) in the format the model expects"
        )
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    enc = [(m["role"].encode(), m["content"].encode()) for m in msgs]  # kept alive during the call
    arr = (L.llama_chat_message * len(enc))(*[L.llama_chat_message(role=r, content=c) for r, c in enc])
    size = max(4096, 2 * sum(len(c) for _, c in enc) + 1024)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = L.llama_chat_apply_template(tmpl, arr, len(enc), True, buf, size)
        if n < 0:
            raise PromptError(
                "llama.cpp does not support this model's chat template; pass the prompt raw (chat_template=False)"
            )
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1
    raise PromptError("chat template output too long")


def prompt_text(lm: LoadedModel, prompt: str, n_images: int, chat_template: bool) -> str:
    """The prompt with one marker per image (all in front when it has none), in the chat template if asked."""
    n_markers = prompt.count(lm.marker)
    if n_markers == 0 and n_images:
        prompt = lm.marker * n_images + prompt
    elif n_markers != n_images:
        raise PromptError(
            f"the prompt has {n_markers} image marker(s) {lm.marker!r} but "
            f"{n_images} image(s) were given: use one marker per image, or none "
            "to put all images before the prompt"
        )
    return apply_chat_template(lm, prompt) if chat_template else prompt


def prepare(lm: LoadedModel, prompt: str, images: list, chat_template: bool) -> Prepared:
    """Images loaded and the prompt tokenized into chunks, checked against the context."""
    text = prompt_text(lm, prompt, len(images), chat_template)
    prep = Prepared(chunks=M.mtmd_input_chunks_init(), n_pos=0, n_tokens=0, n_image_tokens=0)
    try:
        for img in images:
            prep.bitmaps.append(load_bitmap(M, lm._mctx, img))
        raw = text.encode("utf-8")
        itext = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
        arr = (ctypes.c_void_p * max(1, len(prep.bitmaps)))(*prep.bitmaps)
        rc = M.mtmd_tokenize(lm._mctx, prep.chunks, ctypes.byref(itext), arr, len(prep.bitmaps))
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
