"""Exceptions raised by vp_gguf. Each message says what is wrong and what to do."""

from __future__ import annotations


class VPGGUFError(RuntimeError):
    """Base class of every vp_gguf error."""


class ModelFileError(VPGGUFError, ValueError):
    """A model or mmproj file is missing, truncated or not a usable GGUF."""


class ProjectorMismatchError(VPGGUFError, ValueError):
    """The mmproj does not belong to the language model (embedding sizes differ)."""


class ImageError(VPGGUFError, ValueError):
    """An image could not be read or decoded."""


class VideoError(ImageError):
    """A video could not be read, or ffmpeg is missing."""


class MediaLimitError(ImageError):
    """An image or video is larger than the limit set for it (pixels, frames or bytes)."""


class PromptError(VPGGUFError, ValueError):
    """The prompt does not fit the images given (e.g. more markers than images)."""


class ContextOverflowError(VPGGUFError, ValueError):
    """The prompt and its image tokens do not fit in the context window."""


class DecodeError(VPGGUFError):
    """llama.cpp failed to evaluate a batch."""


class InvalidArgumentError(VPGGUFError, ValueError):
    """An argument is out of range or of the wrong type: a model, sampling or VisionPulse setting, a token id."""


class ResourceLimitError(VPGGUFError, ValueError):
    """A setting asks for more than this machine has (e.g. a KV cache larger than the available memory)."""


class RpcError(VPGGUFError, ConnectionError):
    """An RPC server could not be reached or was lost; the message names it. A model that lost one
    must be loaded again (its layers there are gone)."""


class ModelClosedError(VPGGUFError):
    """The model was closed: its native handles are freed; load it again to use it."""


class ModelBusyError(VPGGUFError):
    """The model is already generating (one generation at a time per model)."""
