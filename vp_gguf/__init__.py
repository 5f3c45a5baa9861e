"""vp-gguf: GGUF vision-language models with VisionPulse per-step visual token selection.

The public names load lazily: ``import vp_gguf`` (and so ``vp-gguf --help``,
``models`` and ``fetch``) does not load libllama; the first use of a model
class does. Importing it still points ``llama_cpp`` at vp-gguf's libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _libdir
from .errors import (
    ContextOverflowError,
    DecodeError,
    ImageError,
    InvalidArgumentError,
    MediaLimitError,
    ModelBusyError,
    ModelClosedError,
    ModelFileError,
    ProjectorMismatchError,
    PromptError,
    ResourceLimitError,
    RpcError,
    VideoError,
    VPGGUFError,
)

if TYPE_CHECKING:
    from .fetch import FetchedModel, FetchError, fetch  # noqa: F401
    from .llama_cpp_dropin import VisionPulseSession, enable_visionpulse  # noqa: F401
    from .model import ModelParams, VisionModel  # noqa: F401
    from .result import GenerationResult, ImageSpan, Timings, locate  # noqa: F401
    from .sampling import SamplingParams  # noqa: F401
    from .video import Video  # noqa: F401
    from .visionpulse import StepStats, VisionPulse, VisionPulseReport  # noqa: F401

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "VisionModel": "model",
    "ModelParams": "model",
    "SamplingParams": "sampling",
    "GenerationResult": "result",
    "Timings": "result",
    "ImageSpan": "result",
    "locate": "result",
    "Video": "video",
    "VisionPulse": "visionpulse",
    "VisionPulseReport": "visionpulse",
    "StepStats": "visionpulse",
    "enable_visionpulse": "llama_cpp_dropin",
    "VisionPulseSession": "llama_cpp_dropin",
    "fetch": "fetch",
    "FetchedModel": "fetch",
    "FetchError": "fetch",
}
# the lazy names, then the errors (ruff cannot read the unpacking; the names are strings)
__all__ = [  # noqa: PLE0604
    *_LAZY,
    "VPGGUFError",
    "ModelFileError",
    "ProjectorMismatchError",
    "ImageError",
    "VideoError",
    "PromptError",
    "ContextOverflowError",
    "DecodeError",
    "InvalidArgumentError",
    "ResourceLimitError",
    "MediaLimitError",
    "ModelClosedError",
    "ModelBusyError",
    "RpcError",
]

_libdir.try_point_llama_cpp()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vp_gguf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
